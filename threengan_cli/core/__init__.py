"""The ground floor: settings, paths, atomic file writes, machine facts; imports no other layer."""
