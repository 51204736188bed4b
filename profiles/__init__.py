"""Step-time profiles shipped with blockproxy (package data; see profiles/README.md).

Installed as ``blockproxy.profiles``; load them with :func:`blockproxy.profile.load_profile`.
"""
