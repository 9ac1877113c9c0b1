"""`libnet` CLI sub-commands of the ONNX adapter."""


def register(subparsers) -> None:
    """Add this adapter's sub-commands to the ``libnet`` CLI."""
