"""Backup points over NBD: nbdkit's Python plugin serving a PointView
(``export``, loaded inside nbdkit through ``plugin_shim.py``), the nbdkit
command line that serves one point (``server``), and nbdfuse mounts of it
(``mount``).  Nothing here speaks the NBD protocol itself: nbdkit does."""
