"""Readers of node facts: kube-proxy's mode, the iptables flavour in use, IPv6 support.

Everything here only reads; it runs commands through the injected `Runner` and reads files under
an injectable ``proc_root`` so tests can point it at a fixture tree.
"""
