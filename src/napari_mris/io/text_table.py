"""LViT description tables (`*_text.xlsx` / `*_text.csv`, columns Image and Description).

Shared by the dataset loader of the training package and by `napari-mris predict` on a split folder, so
both read the same files the same way.
"""

from __future__ import annotations

import csv
from pathlib import Path

from napari_mris.errors import DatasetError

TEXT_SUFFIXES = (".xlsx", ".csv")


def find_text_file(folder: Path) -> Path:
    """The split's description table: exactly one `*_text.xlsx` or `*_text.csv` (any letter case)."""
    candidates = sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES and p.stem.lower().endswith("_text")
    )
    candidates = [p for p in candidates if not p.name.startswith(("~$", "."))]  # Excel lock files, hidden temps
    if not candidates:
        raise DatasetError(
            f"{folder}: no description table: expected a file named like Train_text.xlsx or Train_text.csv "
            "with columns Image and Description"
        )
    if len(candidates) > 1:
        names = ", ".join(p.name for p in candidates)
        raise DatasetError(f"{folder}: several description tables ({names}); keep exactly one")
    return candidates[0]


def read_text_table(path: Path) -> list[tuple[str, str]]:
    """Rows (image name, description) of an LViT text table; header names are matched case-insensitively."""
    if not path.is_file():
        raise DatasetError(f"{path}: description table not found")
    if path.suffix.lower() not in TEXT_SUFFIXES:
        raise DatasetError(f"{path}: a description table must be .csv or .xlsx")
    rows = _read_xlsx(path) if path.suffix.lower() == ".xlsx" else _read_csv(path)
    if not rows:
        raise DatasetError(f"{path}: the description table is empty")
    header = [str(cell).strip().lower() if cell is not None else "" for cell in rows[0]]
    try:
        image_col, text_col = header.index("image"), header.index("description")
    except ValueError as exc:
        raise DatasetError(
            f"{path}: expected columns 'Image' and 'Description' in the first row, found {rows[0]}"
        ) from exc
    table = []
    for row in rows[1:]:
        image = row[image_col] if image_col < len(row) else None
        text = row[text_col] if text_col < len(row) else None
        table.append(("" if image is None else str(image).strip(), "" if text is None else str(text).strip()))
    return table


def _read_xlsx(path: Path) -> list[list[object]]:
    import openpyxl

    try:
        book = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except Exception as exc:  # zipfile.BadZipFile, KeyError, InvalidFileException, ...
        raise DatasetError(f"{path}: cannot read the Excel file ({type(exc).__name__}: {exc})") from exc
    try:
        sheet = book.worksheets[0]
        return [list(row) for row in sheet.iter_rows(values_only=True) if any(c is not None for c in row)]
    finally:
        book.close()


def _read_csv(path: Path) -> list[list[object]]:
    """CSV with ',' ';' or tab as separator (MosMedData+ tables come in more than one flavour)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        text = path.read_text(encoding="latin-1")
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read the description table ({exc})") from exc
    lines = text.splitlines()
    first = lines[0].lower() if lines else ""
    delimiter = next((sep for sep in (";", "\t") if {"image", "description"} <= _cells(first, sep)), ",")
    return [row for row in csv.reader(lines, delimiter=delimiter) if any(cell.strip() for cell in row)]


def _cells(line: str, sep: str) -> set[str]:
    return {cell.strip().strip('"') for cell in line.split(sep)}
