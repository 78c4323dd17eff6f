"""Synthetic brain-tumour slices in the Figshare file format, for tests and the out-of-the-box demo.

Each slice is scikit-image's Shepp–Logan head phantom under a random pose (rotation, scale, shift), contrast (a
gamma curve), a smooth multiplicative bias field and Rician noise, with one tumour painted in. The tumour decides the
class and nothing else does:

* meningioma — extra-axial: a round, bright, homogeneous mass whose broad base lies on the inner skull (anywhere but
  the skull base);
* glioma — intra-axial in one hemisphere, irregular in outline, ring-enhancing: a bright rim around a dark core;
* pituitary — small, bright and oval, on the midline just above the skull base (the bottom of the head).

``tumorMask`` is exactly the painted region and ``tumorBorder`` its outline. Patients have several slices that share
head and tumour, varying slightly in pose and tumour cross-section as neighbouring slices do. Files are MATLAB v7.3
(HDF5 behind a 512-byte MATLAB header) with the layout of the real data: struct ``cjdata`` with ``image`` (int16),
``tumorMask`` (uint8), ``label`` (double), ``PID`` (uint16 character codes) and ``tumorBorder`` (double), every array
stored transposed as MATLAB does, and a ``cvind.mat`` of patient-wise folds 1–5.

Geometry is worked out in *head units*: the 400×400 phantom spans [-1, 1] on both axes, x to the right and y down.
"""
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from functools import lru_cache

import h5py
import numpy as np
from skimage.data import shepp_logan_phantom
from skimage.measure import find_contours
from skimage.transform import warp
from tqdm import tqdm

from lrp_brain.data import CLASS_NAMES, MAX_SIDE, DataError

#: Bumped whenever the generator changes, so cached phantom sets are regenerated.
PHANTOM_VERSION = 1
#: Slices per class in the Figshare data; phantom patients get their class in these proportions.
FIGSHARE_CLASS_COUNTS = (708, 1426, 930)
#: Fewest and most slices per synthetic patient.
SLICES_PER_PATIENT = (3, 8)
#: Folds of ``cvind.mat``.
FOLDS = 5

# the inner boundary of the phantom's skull (its second ellipse) in head units: semi-axes and centre
_BRAIN_SEMI_AXES = (0.6624, 0.874)
_BRAIN_CENTRE_Y = 0.0184
# the phantom's pixels per head unit and its centre in pixels
_PHANTOM_SCALE, _PHANTOM_CENTRE = 200., 199.5
_MATLAB_HEADER = 'MATLAB 7.3 MAT-file, Platform: lrp-brain phantom, Created on: (synthetic) HDF5 schema 1.00 .'


@lru_cache(maxsize=1)
def _head():
    """scikit-image's Shepp–Logan phantom (400×400, skull 1, brain 0.2–0.4, ventricles 0), shipped with it."""
    return shepp_logan_phantom()


def _brain_level(x, y):
    """< 1 inside the skull's inner ellipse, 1 on it: ``(x / a)² + ((y - c) / b)²``."""
    return (x / _BRAIN_SEMI_AXES[0]) ** 2 + ((y - _BRAIN_CENTRE_Y) / _BRAIN_SEMI_AXES[1]) ** 2


@dataclass(frozen=True)
class Head:
    """The pose and contrast of a patient's head: rotation (degrees), scale, shift (image units, [-1, 1] across),
    gamma of the contrast curve and gain to int16 values."""
    rotation: float
    scale: float
    shift: tuple
    gamma: float
    gain: float


@dataclass(frozen=True)
class Tumour:
    """A tumour in head units.

    Attributes
    ----------
    label: int
        The 0-based class.
    centre: tuple
        ``(x, y)``.
    radius: float
        Radius (the mean radius of a glioma, the vertical semi-axis of a pituitary tumour).
    intensity: float
        The enhancing tissue's value on the phantom's scale (skull 1, brain 0.2).
    core: float
        Glioma only: the dark core's value, and ``core_fraction`` its radius relative to the outline.
    core_fraction: float
    harmonics: tuple
        Glioma only: ``(amplitude, phase)`` of the outline's 2nd, 3rd, ... harmonic.
    aspect: float
        Pituitary only: horizontal over vertical semi-axis.
    """
    label: int
    centre: tuple
    radius: float
    intensity: float
    core: float = 0.
    core_fraction: float = 0.
    harmonics: tuple = ()
    aspect: float = 1.

    def outline_radius(self, angle):
        """The distance from the centre to the outline in direction ``angle`` (radians), in head units."""
        if self.label == 1:
            wobble = sum(amplitude * np.cos(order * angle + phase)
                         for order, (amplitude, phase) in enumerate(self.harmonics, start=2))
            return self.radius * (1 + wobble)
        if self.label == 2:
            # the ellipse (x / (r a))² + (y / r)² = 1 in polar form
            return self.radius / np.sqrt((np.cos(angle) / self.aspect) ** 2 + np.sin(angle) ** 2)
        return np.full_like(np.asarray(angle, dtype=float), self.radius)

    def reach(self):
        """The largest distance from the centre to the outline, in head units."""
        if self.label == 1:
            return self.radius * (1 + sum(amplitude for amplitude, _ in self.harmonics))
        return self.radius * max(self.aspect, 1.)

    def paint(self, x, y):
        """Return ``(inside, values)``: where the tumour is and its values there, at head coordinates ``x``, ``y``."""
        dx, dy = x - self.centre[0], y - self.centre[1]
        relative = np.hypot(dx, dy) / self.outline_radius(np.arctan2(dy, dx))
        inside = relative <= 1
        if self.label == 0:
            # extra-axial: the disc is cut by the skull, leaving the broad base against it
            inside &= _brain_level(x, y) < 1
        values = np.full(x.shape, self.intensity)
        if self.label == 1:
            values[relative < self.core_fraction] = self.core
        return inside, values


def _meningioma(rng):
    radius = rng.uniform(.11, .17)
    # any direction but the skull base (straight down, pi/2 with y down, where pituitary tumours sit)
    angle = rng.uniform(np.radians(130), np.radians(410))
    a, b = _BRAIN_SEMI_AXES
    edge = np.array([a * np.cos(angle), _BRAIN_CENTRE_Y + b * np.sin(angle)])
    normal = np.array([np.cos(angle) / a, np.sin(angle) / b])  # outward: the gradient of the ellipse's level
    centre = edge - normal / np.linalg.norm(normal) * radius * rng.uniform(.5, .75)
    return Tumour(0, tuple(centre), radius, intensity=rng.uniform(.8, .95))


def _glioma(rng):
    angles = np.linspace(0, 2 * np.pi, 90, endpoint=False)
    while True:
        tumour = Tumour(
            1, (rng.choice((-1, 1)) * rng.uniform(.28, .4), rng.uniform(-.45, .4)), rng.uniform(.13, .18),
            intensity=rng.uniform(.7, .9), core=rng.uniform(0, .08), core_fraction=rng.uniform(.45, .6),
            harmonics=tuple((rng.uniform(0, .1), rng.uniform(0, 2 * np.pi)) for _ in range(3)),
        )
        # intra-axial, in one hemisphere: the outline (at the largest slice radius) clear of skull and midline
        reach = tumour.outline_radius(angles) * 1.1
        x, y = tumour.centre[0] + reach * np.cos(angles), tumour.centre[1] + reach * np.sin(angles)
        if _brain_level(x, y).max() < .8 and (np.sign(x) == np.sign(tumour.centre[0])).all() and abs(x).min() > .04:
            return tumour


def _pituitary(rng):
    radius = rng.uniform(.07, .09)
    bottom = _BRAIN_CENTRE_Y + _BRAIN_SEMI_AXES[1]
    centre = (rng.uniform(-.03, .03), bottom - radius * 1.1 - rng.uniform(.02, .06))
    return Tumour(2, centre, radius, intensity=rng.uniform(.6, .8), aspect=rng.uniform(1.1, 1.4))


def draw_patient(rng, label):
    """Draw a patient's head pose, contrast and tumour of class ``label`` (0-based).

    Returns
    -------
    head: Head
    tumour: Tumour
    """
    if label not in range(len(CLASS_NAMES)):
        raise DataError(f'phantom label must be 0, 1 or 2, got {label!r}')
    head = Head(
        rotation=rng.uniform(-20, 20), scale=rng.uniform(.8, 1.), shift=tuple(rng.uniform(-.06, .06, size=2)),
        gamma=rng.uniform(.75, 1.3), gain=rng.uniform(500, 1500),
    )
    return head, (_meningioma, _glioma, _pituitary)[label](rng)


def _outline(mask):
    """The mask's outline as (K, 2) ``(x, y)`` points in MATLAB's 1-based pixel coordinates (x the column)."""
    rows, columns = np.nonzero(mask)
    if not rows.size:
        return np.zeros((0, 2))
    top, left = rows.min() - 1, columns.min() - 1
    window = np.pad(mask, 1)[top + 1:rows.max() + 3, left + 1:columns.max() + 3].astype(float)
    contour = max(find_contours(window, .5), key=len)
    # window (row, column) -> image (row, column) -> MATLAB (x, y) = (column + 1, row + 1)
    return np.stack([contour[:, 1] + left + 1, contour[:, 0] + top + 1], axis=1)


def _affine(rotation, scale, shift):
    """The 3×3 map from image units to head units (x, y, 1): undo the shift, then the rotation and scale."""
    cos, sin = np.cos(rotation), np.sin(rotation)
    unshift = np.array([[1., 0, -shift[0]], [0, 1, -shift[1]], [0, 0, 1]])
    unrotate = np.array([[cos / scale, sin / scale, 0], [-sin / scale, cos / scale, 0], [0, 0, 1]])
    return unrotate @ unshift


def make_slice(rng, label, size, anatomy=None):
    """Make one synthetic slice.

    Parameters
    ----------
    rng: numpy.random.Generator
    label: int
        The 0-based class.
    size: int
        The image side in pixels.
    anatomy: tuple of (Head, Tumour), optional
        The patient (:func:`draw_patient`); a new one is drawn if ``None``. Pose and tumour size vary per slice.

    Returns
    -------
    image: numpy.ndarray
        (size, size) int16.
    mask: numpy.ndarray
        (size, size) uint8: 1 exactly where the tumour was painted.
    border: numpy.ndarray
        (K, 2) float64: the mask's outline as ``(x, y)`` in MATLAB's 1-based pixel coordinates.
    """
    head, tumour = anatomy if anatomy is not None else draw_patient(rng, label)
    if tumour.label != label:
        raise DataError(f'phantom anatomy holds a {CLASS_NAMES[tumour.label]}, asked for {CLASS_NAMES[label]}')
    # this slice: the head slightly moved, the tumour cut at a slightly different width
    rotation = np.radians(head.rotation + rng.normal(0, 2))
    shift = np.asarray(head.shift) + rng.normal(0, .01, size=2)
    tumour = replace(tumour, radius=tumour.radius * rng.uniform(.85, 1.1))

    # pixel (column, row) -> image units in [-1, 1], y down -> head units -> phantom pixels
    pixel_to_image = np.array([[2 / size, 0, 1 / size - 1], [0, 2 / size, 1 / size - 1], [0, 0, 1]])
    pixel_to_head = _affine(rotation, head.scale, shift) @ pixel_to_image
    head_to_phantom = np.array([[_PHANTOM_SCALE, 0, _PHANTOM_CENTRE], [0, _PHANTOM_SCALE, _PHANTOM_CENTRE], [0, 0, 1]])
    values = warp(_head(), head_to_phantom @ pixel_to_head, output_shape=(size, size), order=1).astype(np.float32)

    # paint the tumour within its bounding window: a disc of radius reach around its centre, in pixels
    centre_column, centre_row, _ = np.linalg.solve(pixel_to_head, [*tumour.centre, 1])
    reach = tumour.reach() * head.scale * size / 2 + 2
    top, bottom = (int(np.clip(centre_row + sign * reach, 0, size)) for sign in (-1, 1))
    left, right = (int(np.clip(centre_column + sign * reach, 0, size)) for sign in (-1, 1))
    rows, columns = np.mgrid[top:bottom, left:right]
    head_x, head_y, _ = np.tensordot(pixel_to_head, np.stack([columns, rows, np.ones_like(rows)]), axes=1)
    inside, tumour_values = tumour.paint(head_x, head_y)
    values[top:bottom, left:right][inside] = tumour_values[inside]
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[top:bottom, left:right] = inside

    values **= head.gamma
    # a smooth multiplicative bias field exp(a x + b y + c (x² + y²)), separable in x and y
    image_x = (np.arange(size, dtype=np.float32) + .5) / size * 2 - 1
    slope_x, slope_y, curvature = rng.uniform(-.25, .25), rng.uniform(-.25, .25), rng.uniform(-.2, .2)
    values *= np.exp(slope_y * image_x + curvature * image_x ** 2)[:, None]
    values *= np.exp(slope_x * image_x + curvature * image_x ** 2)[None, :]
    # Rician noise: the magnitude of a complex signal with Gaussian noise on both parts
    sigma = np.float32(rng.uniform(.01, .04))
    values += sigma * rng.standard_normal((size, size), dtype=np.float32)
    values = np.hypot(values, sigma * rng.standard_normal((size, size), dtype=np.float32))
    image = np.clip(np.round(values * head.gain), 0, np.iinfo(np.int16).max).astype(np.int16)
    return image, mask, _outline(mask)


def _matlab_header():
    """The 512-byte MATLAB v7.3 userblock: header text, subsystem offset, version 0x0200 and endian mark 'IM'."""
    text = _MATLAB_HEADER.ljust(116).encode('ascii')
    return (text + bytes(8) + np.uint16(0x0200).tobytes() + b'IM').ljust(512, b'\x00')


def _matlab_array(parent, name, array, matlab_class, compress=False):
    """Store a MATLAB (rows × columns) array as MATLAB does: transposed, with its class attribute."""
    stored = np.ascontiguousarray(np.asarray(array).T)
    options = {'compression': 'gzip', 'compression_opts': 1} if compress else {}
    dataset = parent.create_dataset(name, data=stored, **options)
    dataset.attrs.create('MATLAB_class', np.bytes_(matlab_class))
    if matlab_class == 'char':
        dataset.attrs.create('MATLAB_int_decode', np.int32(2))
    return dataset


def _write_mat(path, fill):
    """Write a MATLAB v7.3 file atomically: ``fill(h5py.File)`` adds the variables, then the header goes first."""
    path = os.fspath(path)
    temporary = f'{path}.tmp{os.getpid()}'
    with h5py.File(temporary, 'w', userblock_size=512) as file:
        fill(file)
    with open(temporary, 'r+b') as file:
        file.write(_matlab_header())
    os.replace(temporary, path)


def write_slice(path, image, mask, label, patient, border):
    """Write one slice as a Figshare MATLAB v7.3 file.

    Parameters
    ----------
    path: str or os.PathLike
    image: numpy.ndarray
        (H, W) int16.
    mask: numpy.ndarray
        (H, W) 0/1, stored as uint8.
    label: int
        The 0-based class; the file holds ``label + 1``.
    patient: str
        Stored as a 1×L MATLAB char (uint16 codes).
    border: numpy.ndarray
        (K, 2) ``(x, y)`` points, stored as a 1×2K double ``x1, y1, x2, y2, ...``.
    """
    def fill(file):
        struct = file.create_group('cjdata')
        struct.attrs.create('MATLAB_class', np.bytes_('struct'))
        names = ('PID', 'image', 'label', 'tumorBorder', 'tumorMask')
        field_names = np.empty(len(names), dtype=object)  # MATLAB lists a struct's fields as ragged char arrays
        field_names[:] = [np.array(list(name), dtype='S1') for name in names]
        struct.attrs.create('MATLAB_fields', field_names, dtype=h5py.vlen_dtype(np.dtype('S1')))
        _matlab_array(struct, 'PID', np.array([[ord(char) for char in patient]], dtype=np.uint16), 'char')
        _matlab_array(struct, 'image', image.astype(np.int16), 'int16', compress=True)
        _matlab_array(struct, 'label', np.array([[label + 1]], dtype=np.float64), 'double')
        _matlab_array(struct, 'tumorBorder', np.asarray(border, dtype=np.float64).reshape(1, -1), 'double')
        _matlab_array(struct, 'tumorMask', mask.astype(np.uint8), 'uint8', compress=True)
    _write_mat(path, fill)


def write_cvind(path, folds):
    """Write ``cvind.mat``: the fold of every image as an N×1 MATLAB double ``cvind``."""
    _write_mat(path, lambda file: _matlab_array(file, 'cvind', np.asarray(folds, dtype=np.float64)[:, None], 'double'))


def _patient_id(rng, taken):
    while True:
        digits = ''.join(str(digit) for digit in rng.integers(0, 10, size=6))
        patient = f'MR{digits}{chr(ord("A") + rng.integers(26))}' if rng.random() < .5 else digits
        if patient not in taken:
            taken.add(patient)
            return patient


def _plan(n, seed, sizes):
    """Draw the patients: ``[(label, patient id, size, slice count)]``, every class and size present if n allows."""
    rng = np.random.default_rng([seed, 0])
    counts = []
    while sum(counts) < n:
        counts.append(min(int(rng.integers(SLICES_PER_PATIENT[0], SLICES_PER_PATIENT[1] + 1)), n - sum(counts)))
    if len(counts) > 1 and counts[-1] < SLICES_PER_PATIENT[0]:
        last = counts.pop()
        counts[-1] += last  # no patient with fewer slices than the least, unless n is smaller
    proportions = np.asarray(FIGSHARE_CLASS_COUNTS) / sum(FIGSHARE_CLASS_COUNTS)
    labels = list(rng.permutation(len(CLASS_NAMES))) + list(rng.choice(len(CLASS_NAMES), len(counts), p=proportions))
    patient_sizes = list(rng.permutation(sizes)) + list(rng.choice(sizes, len(counts)))
    order = rng.permutation(len(counts))
    taken = set()
    return [(int(labels[position]), _patient_id(rng, taken), int(patient_sizes[position]), counts[index])
            for index, position in enumerate(order)]


def _folds(plan, rng):
    """Patient-wise folds 1..FOLDS per slice: per class, patients in random order join the fold with fewest slices."""
    fold_of_patient, slices_in_fold = {}, np.zeros(FOLDS)
    for label in range(len(CLASS_NAMES)):
        members = [index for index, entry in enumerate(plan) if entry[0] == label]
        class_counts = np.zeros(FOLDS)
        for index in rng.permutation(members):
            fold = int(np.lexsort((np.arange(FOLDS), slices_in_fold, class_counts))[0])
            fold_of_patient[index] = fold + 1
            class_counts[fold] += plan[index][3]
            slices_in_fold[fold] += plan[index][3]
    return [fold_of_patient[index] for index, entry in enumerate(plan) for _ in range(entry[3])]


def _check_sizes(sizes):
    sizes = tuple(int(size) for size in sizes)
    if not sizes or any(size < 16 or size > MAX_SIDE for size in sizes):
        raise DataError(f'phantom sizes must be integers from 16 to {MAX_SIDE}, got {sizes}')
    return sizes


def write_phantoms(out_dir, n, seed=0, sizes=(512, 256), quiet=False):
    """Write ``n`` synthetic slices ``1.mat`` ... ``n.mat`` and a ``cvind.mat`` into ``out_dir``.

    Parameters
    ----------
    out_dir: str or os.PathLike
        Created if missing; must not hold ``.mat`` files already.
    n: int
        Number of slices.
    seed: int
        Everything is drawn from it: the same seed gives the same files, byte for byte.
    sizes: tuple of int
        Image sides; each patient gets one (all appear when there are enough patients).
    quiet: bool
        Hide the progress bar.

    Returns
    -------
    list of str
        The slice files, in order (``cvind.mat`` is beside them).
    """
    if isinstance(n, bool) or int(n) != n or n < 1:
        raise DataError(f'number of phantoms must be a positive integer, got {n!r}')
    sizes = _check_sizes(sizes)
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    existing = sorted(name for name in os.listdir(out_dir) if name.lower().endswith('.mat'))
    if existing:
        raise DataError(f'already holds .mat files ({existing[0]}, ...); choose an empty folder', out_dir, 'exists')
    plan = _plan(int(n), seed, sizes)
    paths = []
    progress = tqdm(total=int(n), desc='writing phantoms', unit='slice', disable=quiet)
    for index, (label, patient, size, count) in enumerate(plan):
        rng = np.random.default_rng([seed, 1, index])
        anatomy = draw_patient(rng, label)
        for _ in range(count):
            image, mask, border = make_slice(rng, label, size, anatomy)
            paths.append(os.path.join(out_dir, f'{len(paths) + 1}.mat'))
            write_slice(paths[-1], image, mask, label, patient, border)
            progress.update()
    progress.close()
    write_cvind(os.path.join(out_dir, 'cvind.mat'), _folds(plan, np.random.default_rng([seed, 2])))
    return paths


def cache_dir():
    """The folder cached phantom sets live in: ``$LRP_BRAIN_CACHE`` or ``~/.cache/lrp-brain``."""
    return os.environ.get('LRP_BRAIN_CACHE') or os.path.join(os.path.expanduser('~'), '.cache', 'lrp-brain')


def phantom_dataset(n=300, seed=0, sizes=(512, 256), quiet=False):
    """A phantom set in the cache folder, written on first use and reused after (for commands run without data).

    The set is written into a temporary folder beside its final place and renamed into place, so an interrupted or
    concurrent run never leaves a half-written set behind.

    Returns
    -------
    str
        The folder (see :func:`write_phantoms` for its contents).
    """
    sizes = _check_sizes(sizes)
    root = cache_dir()
    folder = os.path.join(root, f'phantoms-v{PHANTOM_VERSION}-n{n}-seed{seed}-{"x".join(map(str, sizes))}')
    if os.path.isdir(folder):
        return folder
    os.makedirs(root, exist_ok=True)
    temporary = tempfile.mkdtemp(prefix='.phantoms-', dir=root)
    try:
        write_phantoms(temporary, n, seed, sizes, quiet)
        os.rename(temporary, folder)
    except OSError:
        if not os.path.isdir(folder):
            raise
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return folder
