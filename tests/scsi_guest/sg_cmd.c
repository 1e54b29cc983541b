/* sg_cmd DEV CDB-HEX [DATA-IN-LEN]: send one SCSI command with the SG_IO ioctl
 * and print what came back: "status=S host=H driver=D sense=KEY/ASC/ASCQ resid=R".
 * Built statically by tests/test_scsi_guest.py and run inside the test guest
 * (busybox has no sg3-utils). */
#include <fcntl.h>
#include <scsi/sg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    unsigned char cdb[16], sense[32], *buf = NULL;
    size_t len = 0, n;
    sg_io_hdr_t io;
    int fd;

    if (argc < 3) {
        fprintf(stderr, "usage: %s DEV CDB-HEX [DATA-IN-LEN]\n", argv[0]);
        return 2;
    }
    n = strlen(argv[2]) / 2;
    if (n < 6 || n > sizeof(cdb))
        return 2;
    for (size_t i = 0; i < n; i++) {
        unsigned int b;
        sscanf(argv[2] + 2 * i, "%2x", &b);
        cdb[i] = (unsigned char)b;
    }
    if (argc > 3) {
        len = strtoul(argv[3], NULL, 0);
        buf = calloc(1, len ? len : 1);
    }
    fd = open(argv[1], O_RDWR);
    if (fd < 0) {
        perror(argv[1]);
        return 1;
    }
    memset(&io, 0, sizeof(io));
    memset(sense, 0, sizeof(sense));
    io.interface_id = 'S';
    io.cmd_len = (unsigned char)n;
    io.cmdp = cdb;
    io.dxfer_direction = len ? SG_DXFER_FROM_DEV : SG_DXFER_NONE;
    io.dxferp = buf;
    io.dxfer_len = (unsigned int)len;
    io.sbp = sense;
    io.mx_sb_len = sizeof(sense);
    io.timeout = 20000;
    if (ioctl(fd, SG_IO, &io) < 0) {
        perror("SG_IO");
        return 1;
    }
    printf("status=%d host=%d driver=%d sense=%x/%02x/%02x resid=%d\n", io.status, io.host_status,
           io.driver_status, io.sb_len_wr ? sense[2] & 0xf : 0, io.sb_len_wr ? sense[12] : 0,
           io.sb_len_wr ? sense[13] : 0, io.resid);
    close(fd);
    return 0;
}
