"""`batuta stack versions | check | gate`: what every node runs, whether it is fit, and the verdict.

    versions    a matrix of components (batuta, Python, NumPy, numba, ..., drivers, GPUs) by node
    check       every node concurrently: reachable (host key verified), Python and batuta match,
                numba compiles, CUDA and NVML work where GPUs are declared, disk and memory
    gate        check, plus the cluster file's [policy] and kernel conformance on every backend

Modules: `survey` runs a command over the nodes (`run_stack`), `nodes` reaches one node,
`check`, `gate`, `code` (the user's kernel modules: digests, imports) and `conformance` turn
what a node answered into findings, `versions` reads and compares versions, `report` draws
the result, `node_kernels` is what runs on the nodes.

Nothing is imported here: `node_kernels` is imported by worker slots on every host, which
must not pay for the runtime.
"""
