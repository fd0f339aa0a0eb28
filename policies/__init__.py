"""Pure, pluggable policies: functions of a snapshot of measurements, chosen by name."""
