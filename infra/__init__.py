"""What runs tidlq somewhere else: the local stack, containers, work pools."""
