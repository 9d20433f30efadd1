"""What every command stands on: the registry of buildable classes and safe checkpoint reading."""
