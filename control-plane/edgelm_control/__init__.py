"""edgelm control plane: devices, models, rollouts, remote jobs and telemetry for a fleet.

``edgelm control run --config control.toml`` builds it in :mod:`.service` (the composition
root) from :mod:`.config`. The parts, pure cores first:

* :mod:`.rollouts`: the rollout core (transition tables, waves, gates, selectors, what a
  device's report means, the next step of a wave) and its shells: :mod:`.rollouts.engine`
  (create, pause, resume, abort, late joiners) and :mod:`.rollouts.driver` (reports, clocks,
  gates, driven from the store only);
* :mod:`.jobs`: remote jobs and their per-device states;
* :mod:`.repository`: the fleet's TUF repository: pushes checked against root
  (:mod:`.repository.push`), published with the online keys (:mod:`.repository.service`);
* :mod:`.director`: signed, sequenced, retained desired states, re-signed before expiry;
* :mod:`.fleet`: the MQTT link, and the ingest path (decode, dedupe, store in batches, then
  acknowledge end to end);
* :mod:`.store`: SQLAlchemy Core on SQLite or PostgreSQL, Alembic migrations at start;
* :mod:`.api`: the REST API under ``/api/v1`` (with its OpenAPI document), the SSE stream of
  :mod:`.hub`, health, metrics, and the repository over HTTP.

Errors: :mod:`.errors` draws the tree every part derives from.
"""
