"""Linux input event codes (``include/uapi/linux/input-event-codes.h``) the
input device uses, and the US keyboard layout for typing text.

Only numbers: the names are the kernel's, so ``KEY_A`` here is ``KEY_A`` there.
"""
from __future__ import annotations

# event types
EV_SYN = 0x00
EV_KEY = 0x01
EV_REL = 0x02
EV_ABS = 0x03
EV_MSC = 0x04
EV_SW = 0x05
EV_LED = 0x11
EV_SND = 0x12
EV_REP = 0x14
EV_FF = 0x15
EV_MAX = 0x1F

SYN_REPORT = 0
REL_X, REL_Y, REL_HWHEEL, REL_WHEEL = 0x00, 0x01, 0x06, 0x08
ABS_X, ABS_Y = 0x00, 0x01
LED_NUML, LED_CAPSL, LED_SCROLLL = 0x00, 0x01, 0x02
INPUT_PROP_POINTER, INPUT_PROP_DIRECT = 0x00, 0x01

BTN_LEFT, BTN_RIGHT, BTN_MIDDLE, BTN_SIDE, BTN_EXTRA = 0x110, 0x111, 0x112, 0x113, 0x114
BTN_TOUCH = 0x14A

#: key name (without ``KEY_``) -> code
KEYS: dict[str, int] = {
    "ESC": 1, "MINUS": 12, "EQUAL": 13, "BACKSPACE": 14, "TAB": 15,
    "LEFTBRACE": 26, "RIGHTBRACE": 27, "ENTER": 28, "LEFTCTRL": 29,
    "SEMICOLON": 39, "APOSTROPHE": 40, "GRAVE": 41, "LEFTSHIFT": 42, "BACKSLASH": 43,
    "COMMA": 51, "DOT": 52, "SLASH": 53, "RIGHTSHIFT": 54, "KPASTERISK": 55, "LEFTALT": 56,
    "SPACE": 57, "CAPSLOCK": 58, "NUMLOCK": 69, "SCROLLLOCK": 70, "F11": 87, "F12": 88,
    "RIGHTCTRL": 97, "RIGHTALT": 100, "HOME": 102, "UP": 103, "PAGEUP": 104, "LEFT": 105,
    "RIGHT": 106, "END": 107, "DOWN": 108, "PAGEDOWN": 109, "INSERT": 110, "DELETE": 111,
    "LEFTMETA": 125, "RIGHTMETA": 126,
}
KEYS.update({str(d): 2 + (d - 1) % 10 if d else 11 for d in range(10)})  # KEY_1 = 2 .. KEY_9 = 10, KEY_0 = 11
for _row, _first in (("QWERTYUIOP", 16), ("ASDFGHJKL", 30), ("ZXCVBNM", 44)):
    KEYS.update({c: _first + i for i, c in enumerate(_row)})
KEYS.update({f"F{n}": 58 + n for n in range(1, 11)})  # KEY_F1 = 59 .. KEY_F10 = 68

#: mouse button name -> code
BUTTONS: dict[str, int] = {"left": BTN_LEFT, "right": BTN_RIGHT, "middle": BTN_MIDDLE,
                           "side": BTN_SIDE, "extra": BTN_EXTRA}

_UNSHIFTED = {" ": "SPACE", "\n": "ENTER", "\t": "TAB", "-": "MINUS", "=": "EQUAL", "[": "LEFTBRACE",
              "]": "RIGHTBRACE", ";": "SEMICOLON", "'": "APOSTROPHE", "`": "GRAVE", "\\": "BACKSLASH",
              ",": "COMMA", ".": "DOT", "/": "SLASH"}
_SHIFTED = {"!": "1", "@": "2", "#": "3", "$": "4", "%": "5", "^": "6", "&": "7", "*": "8", "(": "9",
            ")": "0", "_": "MINUS", "+": "EQUAL", "{": "LEFTBRACE", "}": "RIGHTBRACE", ":": "SEMICOLON",
            '"': "APOSTROPHE", "~": "GRAVE", "|": "BACKSLASH", "<": "COMMA", ">": "DOT", "?": "SLASH"}


def key_code(name: str) -> int:
    """``"a"``, ``"KEY_A"``, ``"enter"`` or a number -> the key code (ValueError if unknown)."""
    text = name.strip()
    if text.isdigit() and len(text) > 1:
        return int(text)
    upper = text.upper()
    upper = upper[4:] if upper.startswith("KEY_") else upper
    if upper in KEYS:
        return KEYS[upper]
    raise ValueError(f"unknown key {name!r}")


def char_keys(ch: str) -> tuple[int, bool]:
    """The key for one character on a US layout and whether Shift is held."""
    if ch.isascii() and ch.isalpha():
        return KEYS[ch.upper()], ch.isupper()
    if ch.isascii() and ch.isdigit():
        return KEYS[ch], False
    if ch in _UNSHIFTED:
        return KEYS[_UNSHIFTED[ch]], False
    if ch in _SHIFTED:
        return KEYS[_SHIFTED[ch]], True
    raise ValueError(f"cannot type {ch!r} on a US keyboard")
