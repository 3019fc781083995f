"""modeaudit.storage (installed under the modeaudit namespace; see docs/architecture.md)."""
if __name__ != "modeaudit.storage":
    # The folder is importable by path from the repository root; a bare `storage` is some other
    # distribution's name, so refuse it rather than shadow (or be shadowed by) it.
    raise ImportError("this folder is modeaudit.storage; import it as modeaudit.storage (pip install -e . first)")
