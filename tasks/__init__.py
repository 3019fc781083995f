"""modeaudit.tasks (installed under the modeaudit namespace; see docs/architecture.md)."""
if __name__ != "modeaudit.tasks":
    # The folder is importable by path from the repository root; a bare `tasks` is some other
    # distribution's name, so refuse it rather than shadow (or be shadowed by) it.
    raise ImportError("this folder is modeaudit.tasks; import it as modeaudit.tasks (pip install -e . first)")
