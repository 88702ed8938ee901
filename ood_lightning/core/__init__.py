"""Ground-floor utilities every layer may use: errors, atomic io, console, progress and cost
projection, RNG state, host-sync counting, checkpoint reading, where data and models are found."""
