"""Test helpers shipped with vhostuser: mock front-end, the QEMU guest rig
(:mod:`vhostuser.testing.guest`), pytest fixtures."""
