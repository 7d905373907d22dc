"""Rollouts' pure core: what a rollout is and how it moves, with no I/O, clock or store.

- :mod:`.device_states`: one device's part in a rollout, as a transition table;
- :mod:`.rollout_states`: the rollout's own life (running, paused, halted, completed, ...);
- :mod:`.waves`: parsing ``--canary`` and ``--waves``, and splitting a selection into waves;
- :mod:`.gates`: whether a wave is running, passed or failed, health gate included;
- :mod:`.selection`: selectors (devices, labels, class, all) and their matching rule;
- :mod:`.settings`: a rollout's thresholds and clocks;
- :mod:`.errors`: the errors of all of these, drawn as a tree;
- :mod:`.reports`: which row event a device's report means;
- :mod:`.progress`: what the engine does next with a wave (record a verdict, fire an event);
- :mod:`.baselines`: the health gate's baselines, from earlier activations;
- :mod:`.request`: a rollout as the operator asks for it, checked.

The I/O shell around them: :mod:`.actions` (row moves and desired states inside one store
transaction), :mod:`.engine` (create, pause, resume, abort, late joiners) and
:mod:`.driver` (reports, clocks and gates, as a service).

The engine (the I/O shell that stores rows, reads the clock and publishes desired states)
feeds these functions values and acts on what they return; a restart loses nothing because
every decision here is a function of stored state.
"""
