"""Maintenance scripts (the shell ones beside this file drive DVC and Prefect); a package only so that the import
contract (pyproject.toml) covers the Python ones: nothing in the project imports them."""
