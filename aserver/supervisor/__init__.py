"""The supervisor: owns the listening socket and the rings, starts and stops children."""
