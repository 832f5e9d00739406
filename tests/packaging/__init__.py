"""Tests of what the Makefile builds and installs: dist, man pages, make install."""
