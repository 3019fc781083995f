"""modeaudit.flows (installed under the modeaudit namespace; see docs/architecture.md)."""
if __name__ != "modeaudit.flows":
    # The folder is importable by path from the repository root; a bare `flows` is some other
    # distribution's name, so refuse it rather than shadow (or be shadowed by) it.
    raise ImportError("this folder is modeaudit.flows; import it as modeaudit.flows (pip install -e . first)")
