"""Benchmarks that prove, on simulated nodes, what dnsguard changes for pods' DNS.

One entry point, ``python -m bench [--quick] [--allow-sysctl]`` (`bench.run`), builds a lab
node per path, runs every scenario on every path, and writes ``bench/results/<date>.json``,
``<date>.md`` and PNG plots. Layout, with the pure parts separate so they can be unit-tested:

    spec       what runs: paths, scenarios, the full and quick profiles      (pure)
    results    worker outputs -> per-run statistics, deltas, ratios          (pure)
    targets    the issue's targets judged from a results document            (pure)
    report     markdown from a results document                              (pure)
    plots      PNGs from a results document (matplotlib, optional)
    worker     the load generator run inside each client pod
    node       one path on one lab node: agent, reference cache, counters
    sysctl     lowering the global conntrack limits, and always restoring them
    rulesync   one restore against one exec per rule
    footprint  RSS and CPU of the agent
    external   --external-to-cluster at 10k Services: sync times, kakao-style, agent RSS
    fakeapi    the fake Kubernetes API the agent measurements take their facts from
    ipvs       IPVS mode inside the qemu VM (host side and guest side)
    run        orchestration and the command line
"""
