"""Step-time profiles (package data; the format is in profiles/README.md).

Installed twice, as ``blockproxy.profiles`` (read by :func:`blockproxy.profile.load_profile`)
and as ``loadgen.profiles`` (read by the emulator's own reader), so that neither package
needs the other to find them.
"""
