"""Root of the test suite. pytest puts this folder on sys.path because this file is here, so the test
folders share helpers as plain modules (``tiny_setup``)."""
