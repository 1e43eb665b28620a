"""The conn process: owns client sockets, frames packets, talks to workers over rings."""
