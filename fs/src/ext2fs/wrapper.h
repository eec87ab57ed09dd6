/* Input for bindgen; see gen-bindings.sh. */
#include <ext2fs/ext2_fs.h>
#include <ext2fs/ext2fs.h>
#include <ext2fs/ext2_ext_attr.h>
#include <et/com_err.h>
