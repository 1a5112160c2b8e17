"""Helpers shared by test modules: fact factories, constants, lab and API helpers.

A test module never imports another test module (its tests would be collected twice and its
fixtures would leak); what two test modules need lives here. `tests` is importable because
pytest puts the repository root on sys.path (``pythonpath = ["."]`` in pyproject.toml), so no
test needs a sys.path hack. tests/integration/dnsguard_helpers.py (the lab-side helpers imported
by ~17 integration modules by its bare name) still lives beside them.
"""
