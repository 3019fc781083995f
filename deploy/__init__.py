"""modeaudit.deploy (installed under the modeaudit namespace; see docs/architecture.md)."""
if __name__ != "modeaudit.deploy":
    # The folder is importable by path from the repository root; a bare `deploy` is some other
    # distribution's name, so refuse it rather than shadow (or be shadowed by) it.
    raise ImportError("this folder is modeaudit.deploy; import it as modeaudit.deploy (pip install -e . first)")
