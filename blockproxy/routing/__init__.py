"""Where a request goes: describe it (``describe``: tokens, predicted length), let the
configured policy choose (``policies``), reserve it there (``dispatch``)."""
