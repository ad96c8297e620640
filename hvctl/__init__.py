"""hvctl: a thin libvirt controller that runs KVM guests on rblock disks, on any node.

    config.py      the [hvctl] table and the guests of the cluster file
    domain.py      libvirt domain XML for a guest, and back (pure)
    virt.py        one node's libvirt: connection, domains, lifecycle events (libvirtaio)
    probe.py       which domain type (kvm or qemu/TCG) a node can really run
    controller.py  where a guest runs; start, stop, move across nodes
    cli.py         the `hvctl` command line
"""
