"""Stand-in for Slicer's ``ctk`` Python module: only ctkCollapsibleButton (see qt.py for the rules)."""

import qt


class ctkCollapsibleButton(qt.QAbstractButton):
    SIGNALS = ("contentsCollapsed(bool)",)
    PROPERTIES = ("collapsed", "collapsedHeight", "contentsFrameShape", "buttonTextAlignment")

    def __init__(self, parent=None):
        super().__init__("", parent)
        object.__setattr__(self, "_collapsed", False)

    @property
    def collapsed(self):
        return self._collapsed

    @collapsed.setter
    def collapsed(self, value):
        value = bool(value)
        if value != self._collapsed:
            object.__setattr__(self, "_collapsed", value)
            self._emit("contentsCollapsed(bool)", value)


DESIGNER_CLASSES = {"ctkCollapsibleButton": ctkCollapsibleButton}
