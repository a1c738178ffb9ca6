"""Pallas kernels for collectives (the custom small-tensor all-reduce), each with a pure-JAX reference."""
