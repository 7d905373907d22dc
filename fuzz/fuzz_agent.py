"""atheris harness for the agent's receiver, ``SyncSession.on_message``. Not run by ``make test``.

::

    .venv/bin/python fuzz/fuzz_agent.py -max_total_time=180 fuzz/corpus-agent

The first byte of each input picks a topic, the rest is the payload. Any exception, or a bad
message answered with anything but ``[Dropped(code), AckInbound]``, is a crash.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

with atheris.instrument_imports():
    from edgelm_agent.sync.session import AckInbound, Dropped, EnqueueJob, SyncSession
    from edgelm_protocol import MessageRefused, decode
    from edgelm_protocol.signing import DirectorKeys

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fuzz.common import DEVICE, FLEET, split, write_seeds

KEYS = DirectorKeys([Ed25519PrivateKey.generate().public_key()])
SESSION = SyncSession(fleet=FLEET, device=DEVICE, keys=KEYS, agent_version="0.1")
TOKEN = object()


def test_one_input(data: bytes) -> None:
    topic, payload = split(data)
    actions = SESSION.on_message(topic, payload, TOKEN, 1_800_000_000)
    try:
        decode(topic, payload)
        refused = False
    except MessageRefused:
        refused = True
    if refused or topic not in SESSION._inbound_topics:
        assert len(actions) == 2, actions
        assert isinstance(actions[0], Dropped), actions
        assert actions[0].code, actions
        assert actions[1] == AckInbound(TOKEN), actions
    else:
        acks = [a for a in actions if isinstance(a, AckInbound | EnqueueJob)]
        assert len(acks) == 1, actions


def main() -> None:
    corpus = [arg for arg in sys.argv[1:] if not arg.startswith("-")]
    if corpus:
        write_seeds(Path(corpus[0]))
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
