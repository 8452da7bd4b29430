# Flag sets of every method in docs/method.md, as one implementation configured by flags. They are defined
# once, in moa/method/presets.py (`python -m moa.method.presets --list` names them); this is the shell
# entry of the run scripts.
# Usage: source scripts/methods.sh; method_flags NAME N_LAYERS   (prints the adapter flags on one line;
# an unknown NAME prints the known ones on stderr and returns 2)
method_flags() {
  python3 -m moa.method.presets "$1" "$2"
}
