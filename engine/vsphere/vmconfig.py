"""A VM's configuration (VirtualMachineConfigInfo) as JSON, and back.

Disaster recovery rebuilds a VM from the configuration saved with its backup,
possibly years later and with another pyvmomi, so the saved form must be
plain, stable and readable: JSON in the store's VM record, not pickles or
SOAP XML.  pyvmomi ships an encoder but no decoder, so this module walks the
objects both ways itself, driven by pyvmomi's type information:

* a data object is ``{"_vimtype": "vim.vm.device.VirtualDisk", prop: value, ...}``
  with unset properties and empty lists left out; the type name is kept
  because properties are polymorphic (a ``device`` list holds disks, NICs...);
* a managed object reference is ``"vim.Datastore:datastore-12"``;
* ``binary`` is base64, ``dateTime`` ISO 8601, enums and numbers as they are;
* a value of a property declared ``anyType`` (``OptionValue.value``) that is
  not a plain string, bool, int or float carries its type:
  ``{"_vimtype": "long", "_value": 5}``.

Decoding uses the declared property types, so it rebuilds typed pyvmomi
objects that can go straight into a ConfigSpec (configspec.py).  A property
the running pyvmomi does not know (a config saved by a newer one) is dropped
and reported, not fatal.
"""

from __future__ import annotations

import base64
from datetime import datetime
from typing import Any

from engine.vsphere.errors import VsphereError

TYPE_KEY = "_vimtype"
VALUE_KEY = "_value"
_SKIP_EMPTY = ("dynamicType", "dynamicProperty")


def _support():
    from pyVmomi import VmomiSupport
    return VmomiSupport


def _is_plain(value) -> bool:
    return type(value) in (str, bool, int, float)


def encode(obj, declared: type | None = None) -> Any:
    """A JSON-ready value for a pyvmomi data object (or any property value)."""
    V = _support()
    if obj is None:
        return None
    if isinstance(obj, V.DataObject):
        doc: dict[str, Any] = {TYPE_KEY: V.GetVmodlName(type(obj))}
        for prop in type(obj)._GetPropertyList():
            value = getattr(obj, prop.name, None)
            if value is None or (isinstance(value, list) and not value):
                continue
            if prop.name in _SKIP_EMPTY and not value:
                continue
            doc[prop.name] = encode(value, prop.type)
        return doc
    if isinstance(obj, list):
        item = getattr(declared, "Item", None)
        return [encode(x, item) for x in obj]
    if declared is object and not _is_plain(obj):
        return {TYPE_KEY: V.GetVmodlName(type(obj)), VALUE_KEY: encode(obj, type(obj))}
    if isinstance(obj, V.ManagedObject):
        return f"{V.GetVmodlName(type(obj))}:{obj._moId}"
    if isinstance(obj, V.binary):
        return base64.b64encode(obj).decode("ascii")
    if isinstance(obj, datetime):
        return obj.isoformat()
    if isinstance(obj, type):
        return V.GetVmodlName(obj)
    if isinstance(obj, bool):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj)
    if isinstance(obj, str):
        return str(obj)
    raise VsphereError(f"cannot save a value of type {type(obj).__name__} in a VM configuration")


def decode(doc: Any, declared: type | None = None, dropped: list[str] | None = None, where: str = "config"):
    """The pyvmomi object ``encode`` was given (typed by ``declared`` where needed).

    Property names this pyvmomi does not know are appended to ``dropped``.
    """
    V = _support()
    if doc is None:
        return None
    if isinstance(doc, dict) and TYPE_KEY in doc:
        try:
            cls = V.GetVmodlType(doc[TYPE_KEY])
        except (KeyError, AttributeError):
            raise VsphereError(f"{where}: type {doc[TYPE_KEY]!r} is unknown to this pyvmomi") from None
        if VALUE_KEY in doc:
            return _primitive(cls, decode(doc[VALUE_KEY], cls, dropped, where))
        obj = cls()
        for name, value in doc.items():
            if name == TYPE_KEY:
                continue
            try:
                prop = cls._GetPropertyInfo(name)
            except AttributeError:
                if dropped is not None:
                    dropped.append(f"{where}.{name}")
                continue
            setattr(obj, name, decode(value, prop.type, dropped, f"{where}.{name}"))
        return obj
    if isinstance(doc, list):
        item = getattr(declared, "Item", None)
        return [decode(x, item, dropped, f"{where}[{i}]") for i, x in enumerate(doc)]
    if declared is None or declared is object:
        return doc
    if issubclass(declared, V.ManagedObject):
        type_name, _, moid = str(doc).partition(":")
        return V.GetVmodlType(type_name)(moid)
    if declared is V.binary:
        return V.binary(base64.b64decode(doc))
    if declared is datetime:
        return datetime.fromisoformat(doc)
    if declared is type:
        return V.GetVmodlType(doc)
    return _primitive(declared, doc)


def _primitive(cls: type, value):
    if cls in (str, bool, int, float) or isinstance(value, cls):
        return value
    try:
        return cls(value)
    except (TypeError, ValueError):
        return value


def config_to_json(config) -> dict:
    """A VirtualMachineConfigInfo (e.g. ``snapshot.config``) as a JSON document."""
    return encode(config)


def config_from_json(doc: dict, dropped: list[str] | None = None):
    """The VirtualMachineConfigInfo saved by ``config_to_json``."""
    if not isinstance(doc, dict) or doc.get(TYPE_KEY) != "vim.vm.ConfigInfo":
        raise VsphereError("the saved configuration is not a vim.vm.ConfigInfo document")
    return decode(doc, None, dropped)
