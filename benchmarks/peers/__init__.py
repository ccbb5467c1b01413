"""Reference implementations in other frameworks, for side-by-side benchmarks.

Nothing here is imported by ``crnet_jax``. Each peer is a module runnable as a subprocess
(``python -m benchmarks.peers.<name> ...``) under its own interpreter/venv, and prints one JSON
line per run. Importing this package does not import any of the peers' frameworks.
"""
