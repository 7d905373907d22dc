"""edgelm control plane: devices, models, rollouts and telemetry for a fleet.

Empty for now; the fleet issues fill it.
"""
