"""dnsguard: keep Kubernetes DNS out of conntrack's races, safely for the node's kube-proxy mode.

Layers, imports pointing down only:

    cli / agent            entry points and the reconcile loop
    netfilter / node       the only code that runs iptables, nft, ip, reads /proc
    plan                   pure: NodeFacts + Settings -> Ruleset, and Ruleset -> restore text
    model / config         frozen values shared by everyone
"""

__version__ = "0.1.0"
