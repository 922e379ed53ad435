#!/usr/bin/env bash
# Makes the OCI image the image-import tests use, offline, with standard tools from
# Debian (scripts/deps.sh installs them), from a small root filesystem (busybox):
#
#   scripts/test-oci-image.sh DIR
#
# DIR/layout      an OCI image layout holding image "app": layer 1 with /bin/busybox,
#                 /bin/sh, /app/keep.txt (owned 1000:1000) and /app/gone.txt; layer 2
#                 deleting /app/gone.txt (a whiteout); configuration Env
#                 GREETING="hello from the image", WorkingDir /app, User 1000, Cmd
#                 /bin/sh
# DIR/image.tar   that layout as a tar (an oci-archive)
# DIR/docker.tar  the same image as a `docker save` archive (skopeo), tagged app:latest
set -euo pipefail
dir=${1:?usage: $0 DIR}
cd "$dir"
umoci init --layout layout
umoci new --image layout:app
umoci unpack --image layout:app bundle >/dev/null
mkdir -p bundle/rootfs/bin bundle/rootfs/app
cp /bin/busybox bundle/rootfs/bin/busybox
ln -s busybox bundle/rootfs/bin/sh
echo kept > bundle/rootfs/app/keep.txt
echo 'deleted above' > bundle/rootfs/app/gone.txt
chown 1000:1000 bundle/rootfs/app/keep.txt
# (Refreshed: the next repack is a layer over this one.)
umoci repack --refresh-bundle --image layout:app bundle
rm bundle/rootfs/app/gone.txt
umoci repack --image layout:app bundle
umoci config --image layout:app --config.env 'GREETING=hello from the image' \
  --config.workingdir /app --config.user 1000 --config.cmd /bin/sh
tar -C layout -cf image.tar .
skopeo --insecure-policy copy -q oci:layout:app docker-archive:docker.tar:app:latest
