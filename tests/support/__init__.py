"""Helpers shared by test modules: fact factories, constants, lab and API helpers.

A test module never imports another test module (its tests would be collected twice and its
fixtures would leak); what two test modules need lives here. `tests` is importable because
pytest puts the repository root on sys.path (``pythonpath = ["."]`` in pyproject.toml), so no
test needs a sys.path hack. `lab_helpers` (formerly tests/integration/dnsguard_helpers.py)
holds the lab-side helpers of the integration and VM tests.
"""
