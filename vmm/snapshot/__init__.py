"""Snapshots: save a running VM to a directory, start new VMs from it.

state.py (what a snapshot holds) · statefile.py (the checksummed file) ·
codec.py (state values to JSON and back, checked) · save.py · restore.py ·
cache.py (the warm start of ``vmm run``) · show.py (``vmm snapshot show``).
The devices and the KVM objects each expose their own state value; this
package only collects them.
docs/snapshots.md is the tutorial chapter.
"""
