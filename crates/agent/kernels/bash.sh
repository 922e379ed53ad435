# forkbox bash kernel driver: cells arrive NUL-terminated on fd 3 and are eval'ed in this
# shell, so variables, functions and the working directory persist; "<status>\n" follows.
trap 'true' INT
while IFS= read -r -d '' __forkbox_cell <&3; do
  eval "$__forkbox_cell"
  printf '%d\n' "$?" >&3
done
