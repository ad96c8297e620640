"""hvctl: a thin libvirt controller for KVM guests on rblock disks (see its issue)."""
