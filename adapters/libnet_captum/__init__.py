"""Captum-style attribution adapter for libnet-plugin (install with ``pip install 'libnet-plugin[captum]'``)."""
