"""Test support shipped with dnsguard.

`lab` builds a simulated Kubernetes node out of network namespaces on the running kernel
(bridge, pods, CoreDNS stand-ins, kube-proxy's rules), `kubeproxy` renders kube-proxy's
rules as pure text, and `lookups` generates pod-side DNS load with glibc's racy resolver.
Nothing here runs at import time; building a lab needs root and touches only namespaces
it creates.
"""
