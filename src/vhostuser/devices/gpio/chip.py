"""A simulated GPIO chip: lines with a direction, an output latch, an input
level driven from the host, and an interrupt type.

:class:`SimulatedChip` is pure state (no rings): the device asks it to do what
requests say; the host side (control socket, tests) calls :meth:`drive` to set
an input level and learns which lines' interrupts fire.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from .protocol import Direction, IrqType

log = logging.getLogger(__name__)


class GpioError(Exception):
    """A request the chip refuses (answered with VIRTIO_GPIO_STATUS_ERR)."""


@dataclass
class Line:
    """One GPIO line."""

    name: str = ""
    direction: Direction = Direction.NONE
    #: the output latch (what the guest set)
    output: int = 0
    #: the level the host drives on an input
    input: int = 0
    irq_type: IrqType = IrqType.NONE

    @property
    def value(self) -> int:
        """The line's level: the latch when it is an output, else the input."""
        return self.output if self.direction == Direction.OUT else self.input

    def level_active(self) -> bool:
        """A level interrupt is asserted now."""
        return (self.irq_type == IrqType.LEVEL_HIGH and self.input == 1) or \
            (self.irq_type == IrqType.LEVEL_LOW and self.input == 0)


class SimulatedChip:
    """``ngpio`` simulated lines named ``names`` (missing names are empty)."""

    def __init__(self, ngpio: int, names: list[str] | None = None) -> None:
        if not 1 <= ngpio <= 0xFFFF:
            raise ValueError(f"a chip has 1..65535 lines, not {ngpio}")
        names = list(names or [])
        if len(names) > ngpio:
            raise ValueError(f"{len(names)} names for {ngpio} lines")
        for n in names:
            if "\0" in n:
                raise ValueError(f"line name {n!r} contains NUL")
        self.lines = [Line(name=names[i] if i < len(names) else "") for i in range(ngpio)]

    @property
    def ngpio(self) -> int:
        """Number of GPIO lines."""
        return len(self.lines)

    @property
    def names(self) -> list[str]:
        """The lines' names (config space ``gpio_names``), by line number."""
        return [line.name for line in self.lines]

    def line(self, gpio: int) -> Line:
        """Line ``gpio``; :class:`GpioError` if the chip has no such line."""
        if not 0 <= gpio < len(self.lines):
            raise GpioError(f"line {gpio} outside 0..{len(self.lines) - 1}")
        return self.lines[gpio]

    # ------------------------------------------------------- guest requests
    def set_direction(self, gpio: int, direction: int) -> None:
        """Set line ``gpio``'s direction (none, output, input); :class:`GpioError` for a bad line or value."""
        try:
            d = Direction(direction)
        except ValueError:
            raise GpioError(f"direction {direction} unknown") from None
        self.line(gpio).direction = d

    def set_value(self, gpio: int, value: int) -> None:
        """Drive output line ``gpio`` to ``value`` (0 or 1); :class:`GpioError` otherwise."""
        if value not in (0, 1):
            raise GpioError(f"value {value} is not 0 or 1")
        # Linux sets the value before switching a line to output: latch it in any direction
        self.line(gpio).output = value

    def set_irq_type(self, gpio: int, irq_type: int) -> None:
        """Set line ``gpio``'s interrupt trigger (none, edges, levels); :class:`GpioError` for a bad line or type."""
        try:
            t = IrqType(irq_type)
        except ValueError:
            raise GpioError(f"interrupt type {irq_type} unknown") from None
        line = self.line(gpio)
        if t != IrqType.NONE and line.direction == Direction.OUT:
            raise GpioError(f"line {gpio} is an output: no interrupt")
        line.irq_type = t

    # -------------------------------------------------------------- host side
    def drive(self, gpio: int, level: int) -> bool:
        """Set the input level of ``gpio``; True if that raises its interrupt
        (a matching edge, or an asserted level)."""
        if level not in (0, 1):
            raise GpioError(f"level {level} is not 0 or 1")
        line = self.line(gpio)
        old, line.input = line.input, level
        if line.direction == Direction.OUT:
            return False
        t = line.irq_type
        if old != level and ((t & IrqType.EDGE_RISING and level) or (t & IrqType.EDGE_FALLING and not level)):
            return True
        return line.level_active()
