"""``python -m edgelm_cli`` runs the ``edgelm`` command (tests start the agent this way)."""

from edgelm_cli.main import main

main()
