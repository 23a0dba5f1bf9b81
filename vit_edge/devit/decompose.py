"""DeViT's decomposition of a C-class task into N class subsets, one per device.

falcon-xu/DeViT (commit bbb1a50) shuffles ``range(C)`` with seed 42 and cuts the
shuffled list into N contiguous chunks ``[i*C//N : (i+1)*C//N]``; device i gets a
full small ViT trained only on its chunk. The reference shuffles with Python's
``random.shuffle`` after ``random.seed(42)``; this module does the same with a
private ``random.Random(seed)``, so no global random state is touched and the split
is a pure function of ``(num_classes, num_devices, seed)``.

Example::

    >>> class_subsets(10, 2)
    ((2, 3, 5, 7, 8), (0, 1, 4, 6, 9))
"""

from __future__ import annotations

import random

DEVIT_SEED = 42


def class_subsets(num_classes: int, num_devices: int, seed: int = DEVIT_SEED
                  ) -> tuple[tuple[int, ...], ...]:
  """The N class subsets (original class ids, in shuffled order), one per device.

  Every class lands in exactly one subset; subset sizes differ by at most one.
  Each subset is sorted: class ``subsets[i][j]`` is label ``j`` of device i's
  data view (the reference writes each subset as an ImageFolder, whose labels
  follow the sorted class folders).

  Raises:
    ValueError: unless ``1 <= num_devices <= num_classes``.
  """
  if num_classes < 1 or not 1 <= num_devices <= num_classes:
    raise ValueError(
        f"Cannot split num_classes={num_classes} into num_devices={num_devices} "
        "class subsets; expected 1 <= num_devices <= num_classes (each device needs "
        "at least one class).")
  order = list(range(num_classes))
  random.Random(seed).shuffle(order)
  return tuple(tuple(sorted(order[i * num_classes // num_devices:
                                  (i + 1) * num_classes // num_devices]))
               for i in range(num_devices))
