"""A small stand-in for Slicer's PythonQt ``qt`` module, for running the module's tests without Slicer.

No wheel provides PythonQt, so this one stays a stand-in; every signal, property and method
it offers is checked against real Qt 5 (PyQt5's meta-objects) by
``test_slicer_module.py::test_qt_stand_in_offers_only_what_real_qt_has``.

Only what the KidneyTumorSeg module uses exists, with the names and behaviour of real Qt 5
as PythonQt exposes it: Qt properties read and written as attributes (``button.enabled``),
signals connected by their C++ signature (``obj.connect("clicked(bool)", slot)``), slots called
with as many signal arguments as they accept, programmatic changes emitting the same
signals as in Qt, ``blockSignals``. Writing an attribute that is not a Qt property of the
class, or connecting a signal the class does not have, raises, so the tests fail when the
module uses something real Qt does not have.
"""

from __future__ import annotations

import inspect
import time
from typing import Any, Callable, Dict, List, Optional


def _call_slot(slot: Callable, args: tuple) -> None:
    """Call ``slot`` with as many leading signal arguments as it accepts (PythonQt does this)."""
    try:
        params = inspect.signature(slot).parameters.values()
    except (TypeError, ValueError):
        slot(*args)
        return
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        slot(*args)
        return
    positional = [p for p in params if p.kind in (inspect.Parameter.POSITIONAL_ONLY,
                                                   inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    slot(*args[:len(positional)])


class QObject:
    #: C++ signal signatures of the class (extended by subclasses).
    SIGNALS: tuple = ("destroyed()",)
    #: Qt properties that may be written as attributes.
    PROPERTIES: tuple = ("objectName",)

    def __init__(self, parent=None):
        object.__setattr__(self, "_connections", {})
        object.__setattr__(self, "_signalsBlocked", False)
        object.__setattr__(self, "_children", [])
        object.__setattr__(self, "objectName", "")
        object.__setattr__(self, "_parent", parent)
        if isinstance(parent, QObject):
            parent._children.append(self)

    @classmethod
    def _all(cls, attribute: str) -> set:
        names = set()
        for klass in cls.__mro__:
            names.update(klass.__dict__.get(attribute, ()))
        return names

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_") or name in type(self)._all("PROPERTIES"):
            object.__setattr__(self, name, value)
            return
        raise AttributeError(f"{type(self).__name__} has no Qt property {name!r}")

    # PythonQt exposes objectName also as `name` on read.
    @property
    def name(self) -> str:
        return self.objectName

    def setObjectName(self, name: str) -> None:
        self.objectName = name

    def className(self) -> str:
        return type(self).__name__

    def parent(self):
        return self._parent

    def children(self) -> list:
        return list(self._children)

    def connect(self, signal: str, slot: Callable) -> bool:
        if signal not in type(self)._all("SIGNALS"):
            raise AttributeError(f"{type(self).__name__} has no signal {signal!r}")
        self._connections.setdefault(signal, []).append(slot)
        return True

    def disconnect(self, signal: str, slot: Callable) -> bool:
        slots = self._connections.get(signal, [])
        if slot in slots:
            slots.remove(slot)
            return True
        return False

    def blockSignals(self, block: bool) -> bool:
        previous = self._signalsBlocked
        object.__setattr__(self, "_signalsBlocked", bool(block))
        return previous

    def signalsBlocked(self) -> bool:
        return self._signalsBlocked

    def _emit(self, signal: str, *args) -> None:
        if signal not in type(self)._all("SIGNALS"):
            raise AttributeError(f"{type(self).__name__} has no signal {signal!r}")
        if self._signalsBlocked:
            return
        for slot in list(self._connections.get(signal, [])):
            _call_slot(slot, args)


class Qt:
    RichText = 1
    PlainText = 0
    WaitCursor = 3
    ShiftModifier = 0x02000000


class QIcon:
    def __init__(self, path: str = ""):
        self.path = path


# ------------------------------------------------------------------------------------------
# Event loop pieces
# ------------------------------------------------------------------------------------------

_ACTIVE_TIMERS: List["QTimer"] = []


class QTimer(QObject):
    SIGNALS = ("timeout()",)
    PROPERTIES = ("interval", "singleShot", "active")

    def __init__(self, parent=None):
        super().__init__(parent)
        object.__setattr__(self, "interval", 0)
        object.__setattr__(self, "singleShot", False)
        object.__setattr__(self, "_due", 0.0)

    @property
    def active(self) -> bool:
        return self in _ACTIVE_TIMERS

    def isActive(self) -> bool:
        return self.active

    def setInterval(self, msec: int) -> None:
        self.interval = int(msec)

    def setSingleShot(self, singleShot: bool) -> None:
        self.singleShot = bool(singleShot)

    def start(self, msec: Optional[int] = None) -> None:
        if msec is not None:
            self.interval = int(msec)
        object.__setattr__(self, "_due", time.monotonic() + self.interval / 1000.0)
        if self not in _ACTIVE_TIMERS:
            _ACTIVE_TIMERS.append(self)

    def stop(self) -> None:
        if self in _ACTIVE_TIMERS:
            _ACTIVE_TIMERS.remove(self)

    def _fireIfDue(self, now: float) -> None:
        if self in _ACTIVE_TIMERS and now >= self._due:
            if self.singleShot:
                self.stop()
            else:
                object.__setattr__(self, "_due", now + self.interval / 1000.0)
            self._emit("timeout()")


def _processEvents() -> None:
    """What ``slicer.app.processEvents()`` does here: fire the timers that are due."""
    now = time.monotonic()
    for timer in list(_ACTIVE_TIMERS):
        timer._fireIfDue(now)


def _resetEventLoop() -> None:
    _ACTIVE_TIMERS.clear()
    _fileDialogAnswers.clear()


# ------------------------------------------------------------------------------------------
# Widgets
# ------------------------------------------------------------------------------------------

class QWidget(QObject):
    PROPERTIES = ("enabled", "visible", "toolTip", "styleSheet", "geometry", "minimumHeight",
                  "maximumHeight", "sizePolicy", "statusTip", "whatsThis")

    def __init__(self, parent=None):
        super().__init__(parent)
        object.__setattr__(self, "enabled", True)
        object.__setattr__(self, "visible", True)
        object.__setattr__(self, "toolTip", "")
        object.__setattr__(self, "styleSheet", "")
        object.__setattr__(self, "_layout", None)

    def setEnabled(self, enabled: bool) -> None:
        self.enabled = bool(enabled)

    def setVisible(self, visible: bool) -> None:
        self.visible = bool(visible)

    def show(self) -> None:
        self.visible = True

    def hide(self) -> None:
        self.visible = False

    def setToolTip(self, text: str) -> None:
        self.toolTip = text

    def setLayout(self, layout) -> None:
        object.__setattr__(self, "_layout", layout)

    def layout(self):
        return self._layout


class QLayout(QObject):
    def __init__(self, parent=None):
        super().__init__(None)
        object.__setattr__(self, "_widgets", [])
        if isinstance(parent, QWidget):
            parent.setLayout(self)
            object.__setattr__(self, "_owner", parent)
        else:
            object.__setattr__(self, "_owner", None)

    def addWidget(self, widget, *args) -> None:
        self._widgets.append(widget)
        if self._owner is not None and widget not in self._owner._children:
            self._owner._children.append(widget)
            object.__setattr__(widget, "_parent", self._owner)


class QBoxLayout(QLayout):
    def addStretch(self, stretch: int = 0) -> None:
        pass


class QVBoxLayout(QBoxLayout):
    pass


class QHBoxLayout(QBoxLayout):
    pass


class QFormLayout(QLayout):
    def addRow(self, *args) -> None:
        for arg in args:
            if isinstance(arg, QWidget):
                self.addWidget(arg)


class QAbstractButton(QWidget):
    SIGNALS = ("clicked()", "clicked(bool)", "toggled(bool)", "pressed()", "released()")
    PROPERTIES = ("text", "checkable", "checked", "icon")

    def __init__(self, text: str = "", parent=None):
        super().__init__(parent)
        object.__setattr__(self, "text", text)
        object.__setattr__(self, "checkable", False)
        object.__setattr__(self, "_checked", False)

    @property
    def checked(self) -> bool:
        return self._checked

    @checked.setter
    def checked(self, value: bool) -> None:
        self.setChecked(value)

    def setChecked(self, value: bool) -> None:
        value = bool(value) and self.checkable
        if value != self._checked:
            object.__setattr__(self, "_checked", value)
            self._emit("toggled(bool)", value)

    def isChecked(self) -> bool:
        return self._checked

    def setText(self, text: str) -> None:
        self.text = text

    def click(self) -> None:
        """A user click: does nothing on a disabled button, toggles a checkable one."""
        if not self.enabled:
            return
        if self.checkable:
            self.setChecked(not self._checked)
        self._emit("clicked()")
        self._emit("clicked(bool)", self._checked)


class QPushButton(QAbstractButton):
    PROPERTIES = ("default", "flat", "autoDefault")


class QCheckBox(QAbstractButton):
    SIGNALS = ("stateChanged(int)",)

    def __init__(self, text: str = "", parent=None):
        super().__init__(text, parent)
        object.__setattr__(self, "checkable", True)


class QLabel(QWidget):
    PROPERTIES = ("text", "wordWrap", "textFormat", "alignment", "openExternalLinks")

    def __init__(self, text: str = "", parent=None):
        super().__init__(parent)
        object.__setattr__(self, "text", text)

    def setText(self, text: str) -> None:
        self.text = text


class QComboBox(QWidget):
    SIGNALS = ("currentIndexChanged(int)", "currentTextChanged(QString)", "activated(int)")
    PROPERTIES = ("currentIndex", "currentText", "editable", "maxVisibleItems")

    def __init__(self, parent=None):
        super().__init__(parent)
        object.__setattr__(self, "_items", [])
        object.__setattr__(self, "_current", -1)

    @property
    def count(self) -> int:
        return len(self._items)

    @property
    def currentIndex(self) -> int:
        return self._current

    @currentIndex.setter
    def currentIndex(self, index: int) -> None:
        self.setCurrentIndex(index)

    @property
    def currentText(self) -> str:
        return self._items[self._current][0] if self._current >= 0 else ""

    @property
    def currentData(self):
        return self._items[self._current][1] if self._current >= 0 else None

    def addItem(self, text: str, userData=None) -> None:
        self._items.append((text, userData))
        if self._current < 0:
            self.setCurrentIndex(0)

    def clear(self) -> None:
        self._items.clear()
        self.setCurrentIndex(-1)

    def itemText(self, index: int) -> str:
        return self._items[index][0] if 0 <= index < len(self._items) else ""

    def itemData(self, index: int):
        return self._items[index][1] if 0 <= index < len(self._items) else None

    def findData(self, data) -> int:
        for index, (_, value) in enumerate(self._items):
            if value == data:
                return index
        return -1

    def findText(self, text: str) -> int:
        for index, (value, _) in enumerate(self._items):
            if value == text:
                return index
        return -1

    def setCurrentIndex(self, index: int) -> None:
        index = int(index) if -1 <= int(index) < len(self._items) else self._current
        if index != self._current:
            object.__setattr__(self, "_current", index)
            self._emit("currentIndexChanged(int)", index)
            self._emit("currentTextChanged(QString)", self.currentText)


class QProgressBar(QWidget):
    SIGNALS = ("valueChanged(int)",)
    PROPERTIES = ("value", "minimum", "maximum", "format", "textVisible", "orientation")

    def __init__(self, parent=None):
        super().__init__(parent)
        object.__setattr__(self, "value", 0)
        object.__setattr__(self, "minimum", 0)
        object.__setattr__(self, "maximum", 100)
        object.__setattr__(self, "format", "%p%")

    def setValue(self, value: int) -> None:
        self.value = int(value)

    def setFormat(self, text: str) -> None:
        self.format = text


class QPlainTextEdit(QWidget):
    SIGNALS = ("textChanged()",)
    PROPERTIES = ("plainText", "readOnly", "maximumBlockCount", "lineWrapMode", "placeholderText")

    def __init__(self, parent=None):
        super().__init__(parent)
        object.__setattr__(self, "_lines", [])
        object.__setattr__(self, "readOnly", False)
        object.__setattr__(self, "maximumBlockCount", 0)

    @property
    def plainText(self) -> str:
        return "\n".join(self._lines)

    @plainText.setter
    def plainText(self, text: str) -> None:
        self.setPlainText(text)

    def toPlainText(self) -> str:
        return self.plainText

    def setPlainText(self, text: str) -> None:
        object.__setattr__(self, "_lines", text.split("\n") if text else [])
        self._emit("textChanged()")

    def appendPlainText(self, text: str) -> None:
        self._lines.append(text)
        if self.maximumBlockCount > 0:
            del self._lines[:-self.maximumBlockCount]
        self._emit("textChanged()")


class QTableWidgetItem:
    def __init__(self, text: str = ""):
        self._text = str(text)

    def text(self) -> str:
        return self._text

    def setText(self, text: str) -> None:
        self._text = str(text)


class QAbstractItemView:
    NoEditTriggers = 0
    NoSelection = 0


class QTableWidget(QWidget):
    SIGNALS = ("cellClicked(int,int)", "itemSelectionChanged()")
    PROPERTIES = ("rowCount", "columnCount", "editTriggers", "selectionMode", "selectionBehavior",
                  "alternatingRowColors", "sortingEnabled")

    def __init__(self, parent=None):
        super().__init__(parent)
        object.__setattr__(self, "_cells", {})
        object.__setattr__(self, "_rows", 0)
        object.__setattr__(self, "_columns", 0)
        object.__setattr__(self, "_headers", [])

    @property
    def rowCount(self) -> int:
        return self._rows

    @rowCount.setter
    def rowCount(self, rows: int) -> None:
        self.setRowCount(rows)

    @property
    def columnCount(self) -> int:
        return self._columns

    @columnCount.setter
    def columnCount(self, columns: int) -> None:
        self.setColumnCount(columns)

    def setRowCount(self, rows: int) -> None:
        object.__setattr__(self, "_rows", int(rows))
        for key in [k for k in self._cells if k[0] >= rows]:
            del self._cells[key]

    def setColumnCount(self, columns: int) -> None:
        object.__setattr__(self, "_columns", int(columns))

    def setHorizontalHeaderLabels(self, labels) -> None:
        object.__setattr__(self, "_headers", list(labels))

    def setItem(self, row: int, column: int, item: QTableWidgetItem) -> None:
        if not (0 <= row < self._rows and 0 <= column < self._columns):
            return  # Qt ignores items outside the table
        self._cells[(row, column)] = item

    def item(self, row: int, column: int) -> Optional[QTableWidgetItem]:
        return self._cells.get((row, column))


class QFileDialog(QWidget):
    """``getSaveFileName`` returns a string in PythonQt (PyQt returns a tuple). The answer is
    scripted by the tests (``qt._fileDialogAnswers``); an unscripted dialog fails the test."""

    @staticmethod
    def getSaveFileName(parent=None, caption="", directory="", filter=""):
        if not _fileDialogAnswers:
            raise AssertionError(f"unexpected file dialog: {caption}")
        return _fileDialogAnswers.pop(0)


_fileDialogAnswers: List[str] = []


class QMessageBox:
    Ok = 0x400
    Cancel = 0x400000
    Yes = 0x4000
    No = 0x10000


class QSettings:
    _store: Dict[str, Any] = {}

    def value(self, key: str, default=None):
        return self._store.get(key, default)

    def setValue(self, key: str, value) -> None:
        self._store[key] = value


#: Qt Designer class names this stand-in can build from a .ui file (all real Qt classes).
DESIGNER_CLASSES = {cls.__name__: cls for cls in (QWidget, QPushButton, QCheckBox, QLabel, QComboBox,
                                                  QProgressBar, QPlainTextEdit, QTableWidget)}
LAYOUT_CLASSES = {cls.__name__: cls for cls in (QVBoxLayout, QHBoxLayout, QFormLayout)}
