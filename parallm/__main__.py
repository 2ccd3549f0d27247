from parallm.cli import entry

entry()
