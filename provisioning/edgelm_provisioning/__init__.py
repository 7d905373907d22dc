"""edgelm provisioning and the operator's CLI: runs on the operator's machine only.

``edgelm provision`` (offline, on the fleet directory):

* :mod:`.fleet_init`: a fleet's keys, TUF repository, control.toml, operator token; who holds
  which key, and what leaves the machine;
* :mod:`.enrollment`: device ids, labels, enrollment bundles and the inventory;
* :mod:`.tokens`: operator tokens, stored hashed;
* :mod:`.fleet_dir`, :mod:`.toml_file`: the directory's layout, fleet.toml, URLs.

``edgelm fleet`` (against the control plane's REST API):

* :mod:`.control_client` (aiohttp) and :mod:`.sse` (the event-stream decoder);
* :mod:`.settings`: where the URL and token come from (the one reader of the environment);
* ``models push``: :mod:`.model_source` (hash), :mod:`.repository_check` (verify the server's
  metadata from the fleet's root), :mod:`.targets_signing` (the next targets version, pure),
  :mod:`.model_publisher` (the steps in order);
* ``rollouts watch``: :mod:`.rollout_watch` (stream, then polling) and :mod:`.rollout_view`;
* the commands: :mod:`.provision_cmd`, :mod:`.fleet_cmd`, :mod:`.fleet_models_cmd`,
  :mod:`.fleet_rollouts_cmd`, sharing :mod:`.operator_cli`, :mod:`.cli_values` and
  :mod:`.fleet_output`.

Errors are one tree, drawn in :mod:`.errors`.
"""
