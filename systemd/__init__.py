"""The coordinator's systemd unit and its notes, shipped as package data (``sharedpool systemd-unit`` reads them)."""
