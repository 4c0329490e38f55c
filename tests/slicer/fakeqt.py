# ruff: noqa: N801, N802, N807, N815  (Qt, CTK and Slicer names, as PythonQt spells them)
"""Fake Qt, CTK and Slicer Qt widgets for running the module's real widget class without an application.

Only widgets are faked; MRML nodes and the scene are real (``slicer-core``), and so are Slicer's
``parameterNodeWrapper`` (from ``../shared/slicer_sources/<tag>``) and ``slicer.util`` (the wheel's
copy). The fakes follow Qt's documented rules, as PythonQt exposes them:

* a signal calls its slots in connection order, synchronously, with as many of its arguments as
  each Python slot accepts (PythonQt drops the rest), and not at all while ``blockSignals(True)``;
* value signals (``toggled``, ``stateChanged``, ``currentIndexChanged``, ``textChanged``,
  ``valueChanged``) fire only when the value changes; ``clicked`` only on an enabled button;
* a ``QComboBox`` selects its first item when one is added to an empty box, and ``clear()`` moves
  the index to -1; ``QCheckBox.setChecked`` emits ``stateChanged`` before ``toggled``;
* ``ctkPathLineEdit`` emits ``currentPathChanged`` on every ``setCurrentPath`` and on every
  keystroke of the user;
* ``qMRMLNodeComboBox`` without a None item selects the first node of its types when the scene is
  set or a node is added to an empty selection, and moves to the last node when its node leaves the
  scene (``emitCurrentNodeChanged`` in Slicer's qMRMLNodeComboBox.cxx);
* PythonQt prints an exception raised in a slot and goes on: here it is printed and recorded in
  :data:`ERRORS`, which the tests require to stay empty.
"""

from __future__ import annotations

import inspect
import traceback
import types
import weakref
import xml.etree.ElementTree as ET
from pathlib import Path

#: Exceptions raised inside slots (and VTK observers, through ``sys.excepthook``): PythonQt would
#: only print them.
ERRORS: list[BaseException] = []


def record_error(exc: BaseException) -> None:
    traceback.print_exception(exc)
    ERRORS.append(exc)


def _arity(slot) -> int | None:
    """How many positional arguments a Python slot takes (None: any number)."""
    try:
        sig = inspect.signature(slot)
    except (TypeError, ValueError):
        return None
    n = 0
    for p in sig.parameters.values():
        if p.kind == p.VAR_POSITIONAL:
            return None
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            n += 1
    return n


class BoundSignal:
    def __init__(self, owner: QObject, name: str) -> None:
        self.owner, self.name = owner, name
        self.slots: list = []

    def connect(self, slot) -> None:
        self.slots.append(slot)

    def disconnect(self, slot=None) -> bool:
        """Qt's rule: False (nothing happens) when the slot is not connected."""
        if slot is None:
            self.slots.clear()
            return True
        for k, s in enumerate(self.slots):
            if s == slot:
                del self.slots[k]
                return True
        return False

    def emit(self, *args) -> None:
        if self.owner.signalsBlocked():
            return
        for slot in list(self.slots):
            n = _arity(slot)
            try:
                slot(*(args if n is None else args[:n]))
            except Exception as exc:  # PythonQt prints it and carries on
                record_error(exc)


class Signal:
    """A Qt signal, declared on a class; each instance has its own list of slots."""

    def __set_name__(self, owner, name) -> None:
        self.name = name

    def __get__(self, obj, objtype=None):
        if obj is None:
            return self
        signals = obj.__dict__.setdefault("_signals", {})
        if self.name not in signals:
            signals[self.name] = BoundSignal(obj, self.name)
        return signals[self.name]


class QObject:
    destroyed = Signal()

    def __init__(self, parent: QObject | None = None) -> None:
        self._parent = None
        self._children: list = []
        self._props: dict = {}
        self._blocked = False
        self.objectName = ""
        if parent is not None:
            self.setParent(parent)

    # PythonQt: ``name`` is the objectName property
    @property
    def name(self) -> str:
        return self.objectName

    @name.setter
    def name(self, value: str) -> None:
        self.objectName = value

    def setObjectName(self, value: str) -> None:
        self.objectName = value

    def setParent(self, parent) -> None:
        if self._parent is not None and self in self._parent._children:
            self._parent._children.remove(self)
        self._parent = parent
        if parent is not None:
            parent._children.append(self)

    def parent(self):
        return self._parent

    def children(self) -> list:
        return list(self._children)

    def findChildren(self, cls=None) -> list:
        out = []
        for c in self._children:
            if cls is None or isinstance(c, cls):
                out.append(c)
            out += c.findChildren(cls)
        return out

    def property(self, name: str):
        return self._props.get(name)

    def setProperty(self, name: str, value) -> None:
        self._props[name] = value

    def blockSignals(self, block: bool) -> bool:
        was, self._blocked = self._blocked, bool(block)
        return was

    def signalsBlocked(self) -> bool:
        return self._blocked

    @staticmethod
    def _signal_name(signature: str) -> str:
        return signature.split("(", 1)[0].strip()

    def connect(self, signature: str, slot) -> None:
        """PythonQt's ``obj.connect("signal(args)", callable)``."""
        getattr(self, self._signal_name(signature)).connect(slot)

    def disconnect(self, signature: str, slot=None) -> bool:
        return getattr(self, self._signal_name(signature)).disconnect(slot)

    def isWidgetType(self) -> bool:
        return False

    def deleteLater(self) -> None:
        self.setParent(None)


class QLayout(QObject):
    def __init__(self, parent=None) -> None:
        super().__init__(parent if isinstance(parent, QWidget) else None)
        self._items: list = []
        if isinstance(parent, QWidget):
            parent._layout = self

    def _host(self):
        return self._parent

    def addWidget(self, widget, *args) -> None:
        self._items.append(widget)
        host = self._host()
        if host is not None and isinstance(widget, QWidget):
            widget.setParent(host)

    def addRow(self, *items) -> None:
        for item in items:
            if isinstance(item, QWidget):
                self.addWidget(item)
            elif isinstance(item, QLayout):
                self.addLayout(item)

    def addLayout(self, layout, *args) -> None:
        self._items.append(layout)
        host = self._host()
        if host is not None:
            layout.setParent(host)
            for w in layout._items:
                if isinstance(w, QWidget):
                    w.setParent(host)

    def addItem(self, item) -> None:
        self._items.append(item)

    def setContentsMargins(self, *margins) -> None:
        pass

    def setSpacing(self, spacing: int) -> None:
        pass

    def count(self) -> int:
        return len(self._items)

    def itemAt(self, index: int):
        return self._items[index] if 0 <= index < len(self._items) else None

    def removeItem(self, item) -> None:
        if item in self._items:
            self._items.remove(item)


class QVBoxLayout(QLayout):
    pass


class QHBoxLayout(QLayout):
    pass


class QGridLayout(QLayout):
    pass


class QFormLayout(QLayout):
    pass


class QWidget(QObject):
    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self._layout = None
        self._enabled = True
        self._visible = True
        self.toolTip = ""
        self.styleSheet = ""

    def isWidgetType(self) -> bool:
        return True

    def layout(self):
        return self._layout

    def setLayout(self, layout) -> None:
        self._layout = layout
        layout.setParent(self)

    @property
    def enabled(self) -> bool:
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self._enabled = bool(value)

    def setEnabled(self, value: bool) -> None:
        self.enabled = value

    def isEnabled(self) -> bool:
        return self._enabled

    @property
    def visible(self) -> bool:
        return self._visible

    @visible.setter
    def visible(self, value: bool) -> None:
        self._visible = bool(value)

    def setVisible(self, value: bool) -> None:
        self.visible = value

    def isVisible(self) -> bool:
        return self._visible

    def show(self) -> None:
        self._visible = True

    def hide(self) -> None:
        self._visible = False

    def setToolTip(self, text: str) -> None:
        self.toolTip = text


class QLabel(QWidget):
    def __init__(self, text: str = "", parent=None) -> None:
        super().__init__(parent)
        self.text = text
        self.wordWrap = False

    def setText(self, text: str) -> None:
        self.text = str(text)


class QAbstractButton(QWidget):
    clicked = Signal()
    toggled = Signal()

    def __init__(self, text: str = "", parent=None) -> None:
        super().__init__(parent)
        self.text = text
        self.checkable = False
        self._checked = False

    def _set_checked(self, value: bool) -> None:
        self._checked = bool(value)
        self.toggled.emit(self._checked)

    @property
    def checked(self) -> bool:
        return self._checked

    @checked.setter
    def checked(self, value: bool) -> None:
        if self.checkable and bool(value) != self._checked:
            self._set_checked(value)

    def setChecked(self, value: bool) -> None:
        self.checked = value

    def isChecked(self) -> bool:
        return self._checked

    def setCheckable(self, value: bool) -> None:
        self.checkable = bool(value)

    def setText(self, text: str) -> None:
        self.text = text

    def click(self) -> None:
        """The user's click: nothing on a disabled button."""
        if not self._enabled:
            return
        if self.checkable:
            self._set_checked(not self._checked)
        self.clicked.emit(self._checked)


class QPushButton(QAbstractButton):
    pass


class QToolButton(QAbstractButton):
    pass


class QCheckBox(QAbstractButton):
    stateChanged = Signal()

    def __init__(self, text: str = "", parent=None) -> None:
        super().__init__(text, parent)
        self.checkable = True

    def _set_checked(self, value: bool) -> None:
        self._checked = bool(value)
        self.stateChanged.emit(2 if self._checked else 0)  # QCheckBox::checkStateSet, then toggled
        self.toggled.emit(self._checked)


class QComboBox(QWidget):
    currentIndexChanged = Signal()
    currentTextChanged = Signal()

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self._items: list[tuple[str, object]] = []
        self._index = -1

    def _set_index(self, index: int) -> None:
        if index == self._index:
            return
        self._index = index
        self.currentIndexChanged.emit(index)
        self.currentTextChanged.emit(self.currentText)

    def addItem(self, text: str, data=None) -> None:
        self._items.append((str(text), data))
        if self._index < 0:
            self._set_index(0)

    def clear(self) -> None:
        self._items.clear()
        self._set_index(-1)

    def count(self) -> int:
        return len(self._items)

    def itemText(self, index: int) -> str:
        return self._items[index][0] if 0 <= index < len(self._items) else ""

    def itemData(self, index: int):
        return self._items[index][1] if 0 <= index < len(self._items) else None

    def findData(self, data) -> int:
        return next((k for k, (_, d) in enumerate(self._items) if d == data), -1)

    def findText(self, text: str) -> int:
        return next((k for k, (t, _) in enumerate(self._items) if t == text), -1)

    @property
    def currentIndex(self) -> int:
        return self._index

    @currentIndex.setter
    def currentIndex(self, index: int) -> None:
        self.setCurrentIndex(index)

    def setCurrentIndex(self, index: int) -> None:
        if not -1 <= index < len(self._items):
            return  # Qt ignores an index out of range
        self._set_index(index)

    @property
    def currentText(self) -> str:
        return self.itemText(self._index)

    @property
    def currentData(self):
        return self.itemData(self._index)


class QLineEdit(QWidget):
    textChanged = Signal()
    editingFinished = Signal()
    Normal, NoEcho, Password, PasswordEchoOnEdit = range(4)

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self._text = ""
        self.echoMode = QLineEdit.Normal
        self.placeholderText = ""

    @property
    def text(self) -> str:
        return self._text

    @text.setter
    def text(self, value: str) -> None:
        value = str(value)
        if value != self._text:
            self._text = value
            self.textChanged.emit(value)

    def setText(self, value: str) -> None:
        self.text = value

    def setEchoMode(self, mode: int) -> None:
        self.echoMode = mode

    def type_text(self, text: str) -> None:
        """The user types ``text`` at the end, one key at a time, then leaves the field."""
        for ch in text:
            self.text = self._text + ch
        self.editingFinished.emit()


class QProgressBar(QWidget):
    valueChanged = Signal()

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.minimum, self.maximum, self._value = 0, 100, 0
        self.format = "%p%"
        self.textVisible = True

    @property
    def value(self) -> int:
        return self._value

    @value.setter
    def value(self, v: int) -> None:
        v = int(v)
        if v != self._value:
            self._value = v
            self.valueChanged.emit(v)

    def setValue(self, v: int) -> None:
        self.value = v

    def setMaximum(self, v: int) -> None:
        self.maximum = int(v)

    def setMinimum(self, v: int) -> None:
        self.minimum = int(v)

    def setRange(self, lo: int, hi: int) -> None:
        self.minimum, self.maximum = int(lo), int(hi)

    def setFormat(self, text: str) -> None:
        self.format = text

    def reset(self) -> None:
        self._value = self.minimum - 1


class QTimer(QObject):
    """Fires only when the test pumps the event loop (:func:`process_events`)."""

    timeout = Signal()
    _all: weakref.WeakSet = weakref.WeakSet()
    _single_shots: list = []

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.interval = 0
        self.singleShot_ = False
        self._active = False
        QTimer._all.add(self)

    def setInterval(self, ms: int) -> None:
        self.interval = int(ms)

    def setSingleShot(self, value: bool) -> None:
        self.singleShot_ = bool(value)

    def start(self, ms: int | None = None) -> None:
        if ms is not None:
            self.interval = int(ms)
        self._active = True

    def stop(self) -> None:
        self._active = False

    def isActive(self) -> bool:
        return self._active

    @staticmethod
    def singleShot(ms: int, slot) -> None:
        QTimer._single_shots.append(slot)


def process_events() -> int:
    """One turn of the event loop: every active timer times out once, pending single shots run."""
    n = 0
    shots, QTimer._single_shots = QTimer._single_shots, []
    for slot in shots:
        n += 1
        try:
            slot()
        except Exception as exc:
            record_error(exc)
    for timer in list(QTimer._all):
        if timer._active:
            n += 1
            if timer.singleShot_:
                timer._active = False
            timer.timeout.emit()
    return n


class QSettings(QObject):
    store: dict = {}

    def value(self, key: str, default=None):
        return QSettings.store.get(key, default)

    def setValue(self, key: str, value) -> None:
        QSettings.store[key] = value

    def contains(self, key: str) -> bool:
        return key in QSettings.store

    def remove(self, key: str) -> None:
        QSettings.store.pop(key, None)


class QColor:
    def __init__(self, *args) -> None:
        self.args = args


class QMessageBox(QWidget):
    Ok, Cancel, Yes, No, Retry, Close, NoButton = 0x400, 0x400000, 0x4000, 0x10000, 0x80000, 0x200000, 0
    NoIcon, Information, Warning, Critical, Question = range(5)


class Qt:
    WaitCursor = 3
    ShiftModifier = 0x02000000
    Vertical, Horizontal = 2, 1


class QApplication:
    @staticmethod
    def setOverrideCursor(cursor) -> None:
        pass

    @staticmethod
    def restoreOverrideCursor() -> None:
        pass


class QFile:
    ReadOnly = 1

    def __init__(self, path) -> None:
        self.path = Path(str(path))

    def exists(self) -> bool:
        return self.path.is_file()

    def open(self, mode) -> bool:
        return self.exists()


class QUiLoader:
    """Builds the fake widget tree of a Designer ``.ui`` file, with its dynamic properties and connections."""

    def load(self, qfile: QFile):
        root = ET.parse(qfile.path).getroot()
        named: dict[str, QObject] = {}
        top = self._widget(root.find("widget"), None, named)
        for c in root.iter("connection"):
            sender, receiver = named[c.findtext("sender")], named[c.findtext("receiver")]
            sender.connect(c.findtext("signal"), getattr(receiver, c.findtext("slot").split("(")[0]))
        return top

    def _widget(self, el, parent, named):
        cls = find_class(el.get("class"))
        w = cls()
        if parent is not None:
            w.setParent(parent)
        w.objectName = el.get("name", "")
        named[w.objectName] = w
        self._properties(el, w)
        for child in el:
            if child.tag == "widget":
                self._widget(child, w, named)
            elif child.tag == "layout":
                self._layout(child, w, named)
        return w

    def _layout(self, el, host, named):
        lay = find_class(el.get("class"))(None)
        lay.objectName = el.get("name", "")
        if isinstance(host, QWidget):
            host.setLayout(lay)
        else:  # a layout inside a layout
            host.addLayout(lay)
        for item in el.findall("item"):
            for child in item:
                if child.tag == "widget":
                    w = self._widget(child, lay._host(), named)
                    lay._items.append(w)
                elif child.tag == "layout":
                    self._layout(child, lay, named)
        return lay

    @staticmethod
    def _value(p):
        v = p[0]
        if v.tag == "string":
            return v.text or ""
        if v.tag == "bool":
            return v.text == "true"
        if v.tag == "number":
            return int(v.text)
        if v.tag == "double":
            return float(v.text)
        if v.tag == "stringlist":
            return [s.text for s in v.findall("string")]
        if v.tag in ("enum", "set") and "::" in (v.text or ""):  # QLineEdit::Password -> its value
            cls, name = v.text.split("::", 1)
            try:
                return getattr(find_class(cls), name)
            except (KeyError, AttributeError):
                return v.text
        return v.text

    def _properties(self, el, w) -> None:
        for p in el.findall("property"):
            value = self._value(p)
            if p.get("stdset") == "0":
                w.setProperty(p.get("name"), value)
            elif isinstance(getattr(type(w), p.get("name"), None), property) or hasattr(w, p.get("name")):
                setattr(w, p.get("name"), value)
            else:
                w._props.setdefault("_designer", {})[p.get("name")] = value


# ---------------------------------------------------------------------------------------------
# CTK


class ctkCollapsibleButton(QAbstractButton):
    def __init__(self, parent=None) -> None:
        super().__init__("", parent)
        self.collapsed = False


class ctkPathLineEdit(QWidget):
    currentPathChanged = Signal()
    validInputChanged = Signal()
    Dirs, Files = 0x001, 0x002

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self._path = ""
        self.filters = 0
        self.settingKey = ""

    @property
    def currentPath(self) -> str:
        return self._path

    @currentPath.setter
    def currentPath(self, path: str) -> None:
        self.setCurrentPath(path)

    def setCurrentPath(self, path: str) -> None:
        self._path = str(path)
        self.currentPathChanged.emit(self._path)  # on every call, changed or not

    def type_path(self, text: str) -> None:
        """The user selects the field's text and types ``text`` over it: one currentPathChanged per keystroke."""
        for k in range(1, len(text) + 1):
            self._path = text[:k]
            self.currentPathChanged.emit(self._path)


class ctkSliderWidget(QWidget):
    valueChanged = Signal()

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self._min, self._max, self._value = 0.0, 99.0, 0.0
        self.singleStep = 1.0
        self.decimals = 2

    def _clamp(self) -> None:
        v = min(max(self._value, self._min), self._max)
        if v != self._value:
            self._value = v
            self.valueChanged.emit(v)

    @property
    def minimum(self) -> float:
        return self._min

    @minimum.setter
    def minimum(self, v: float) -> None:
        self._min = float(v)
        self._max = max(self._max, self._min)
        self._clamp()

    @property
    def maximum(self) -> float:
        return self._max

    @maximum.setter
    def maximum(self, v: float) -> None:
        self._max = float(v)
        self._min = min(self._min, self._max)
        self._clamp()

    @property
    def value(self) -> float:
        return self._value

    @value.setter
    def value(self, v: float) -> None:
        v = min(max(float(v), self._min), self._max)
        if v != self._value:
            self._value = v
            self.valueChanged.emit(v)

    def setValue(self, v: float) -> None:
        self.value = v


class ctkCheckBox(QCheckBox):
    pass


class ctkComboBox(QComboBox):
    pass


# ---------------------------------------------------------------------------------------------
# Slicer's Qt widgets (MRML-aware)


class qMRMLWidget(QWidget):
    mrmlSceneChanged = Signal()

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self._scene = None

    def setMRMLScene(self, scene) -> None:
        self._scene = scene
        self.mrmlSceneChanged.emit(scene)

    def mrmlScene(self):
        return self._scene


class qSlicerWidget(qMRMLWidget):
    pass


class qMRMLNodeComboBox(QWidget):
    currentNodeChanged = Signal()
    currentNodeIDChanged = Signal()

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.nodeTypes: list[str] = []
        self.noneEnabled = False
        self.addEnabled = True
        self.removeEnabled = True
        self.showChildNodeTypes = True
        self._scene = None
        self._current = None
        self._tags: list = []

    def _matches(self, node) -> bool:
        if node is None:
            return False
        if self.showChildNodeTypes:
            return any(node.IsA(t) for t in self.nodeTypes)
        return node.GetClassName() in self.nodeTypes

    def nodes(self) -> list:
        if self._scene is None:
            return []
        scene = self._scene
        return [n for n in (scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())) if self._matches(n)]

    def _set_current(self, node) -> None:
        if node is self._current or (node is not None and self._current is not None
                                     and node.GetID() == self._current.GetID() and node.GetScene() is not None):
            return
        self._current = node
        self.currentNodeChanged.emit(node)
        self.currentNodeIDChanged.emit(node.GetID() if node is not None else "")

    def setMRMLScene(self, scene) -> None:
        import vtk

        for obj, tag in self._tags:
            obj.RemoveObserver(tag)
        self._tags = []
        self._scene = scene
        if scene is None:
            self._set_current(None)
            return

        @vtk.calldata_type(vtk.VTK_OBJECT)
        def added(caller, event, node):
            if self._current is None and not self.noneEnabled and self._matches(node):
                self._set_current(node)

        @vtk.calldata_type(vtk.VTK_OBJECT)
        def removed(caller, event, node):
            if self._current is not None and node is self._current:
                rest = [n for n in self.nodes() if n is not node]
                # qMRMLNodeComboBox::emitCurrentNodeChanged: without a None item it takes the last node
                self._set_current(None if self.noneEnabled or not rest else rest[-1])

        self._tags = [(scene, scene.AddObserver(scene.NodeAddedEvent, added)),
                      (scene, scene.AddObserver(scene.NodeRemovedEvent, removed))]
        if self._current is None and not self.noneEnabled and self.nodes():
            self._set_current(self.nodes()[0])

    def mrmlScene(self):
        return self._scene

    def currentNode(self):
        return self._current

    def setCurrentNode(self, node) -> None:
        self._set_current(node)

    @property
    def currentNodeID(self) -> str:
        return self._current.GetID() if self._current is not None else ""

    def setCurrentNodeID(self, ident: str) -> None:
        self._set_current(self._scene.GetNodeByID(ident) if ident else None)


class qMRMLTableView(QWidget):
    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self._table = None
        self._scene = None

    def setMRMLScene(self, scene) -> None:
        self._scene = scene

    def setMRMLTableNode(self, node) -> None:
        self._table = node

    def mrmlTableNode(self):
        return self._table


class qMRMLSliderWidget(ctkSliderWidget):
    pass


class qMRMLSpinBox(QWidget):
    pass


class qMRMLRangeWidget(QWidget):
    pass


# ---------------------------------------------------------------------------------------------
# Modules


def _module(name: str, classes: dict) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__dict__.update(classes)

    def __getattr__(attr: str):  # any other Qt/CTK class the wrapper names in an annotation or check
        if attr.startswith("__"):
            raise AttributeError(attr)
        cls = type(attr, (QWidget,), {})
        setattr(mod, attr, cls)
        return cls

    mod.__getattr__ = __getattr__
    return mod


_QT = {k: v for k, v in globals().items() if k.startswith("Q") and isinstance(v, type)} | {"Qt": Qt}
_CTK = {k: v for k, v in globals().items() if k.startswith("ctk") and isinstance(v, type)}
#: The Qt classes ``slicer`` itself exposes (qMRML*, qSlicer*).
SLICER_WIDGETS = {k: v for k, v in globals().items() if k.startswith(("qMRML", "qSlicer")) and isinstance(v, type)}


def make_modules() -> tuple[types.ModuleType, types.ModuleType]:
    """Fresh ``qt`` and ``ctk`` modules."""
    return _module("qt", dict(_QT)), _module("ctk", dict(_CTK))


def find_class(name: str) -> type:
    for table in (_QT, _CTK, SLICER_WIDGETS):
        if name in table:
            return table[name]
    raise KeyError(f"the fake Qt has no widget class {name}")
