/* gpio_tool: the guest side of tests/test_gpio_guest.py, on the GPIO character
 * device (uAPI v2, linux/gpio.h); built statically (busybox has no gpio tools).
 *
 *   gpio_tool CHIP info                 "LINE NAME" per line
 *   gpio_tool CHIP out LINE VALUE       request LINE as output with VALUE
 *   gpio_tool CHIP get LINE             request LINE as input, print its value
 *   gpio_tool CHIP wait LINE MS         wait up to MS for an edge: "rising", "falling" or "timeout"
 */
#include <fcntl.h>
#include <linux/gpio.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

static int request(int chip, unsigned int line, unsigned long long flags, int value)
{
    struct gpio_v2_line_request req;

    memset(&req, 0, sizeof(req));
    req.offsets[0] = line;
    req.num_lines = 1;
    req.config.flags = flags;
    if (flags & GPIO_V2_LINE_FLAG_OUTPUT) {
        req.config.num_attrs = 1;
        req.config.attrs[0].attr.id = GPIO_V2_LINE_ATTR_ID_OUTPUT_VALUES;
        req.config.attrs[0].attr.values = value ? 1 : 0;
        req.config.attrs[0].mask = 1;
    }
    strcpy(req.consumer, "gpio_tool");
    if (ioctl(chip, GPIO_V2_GET_LINE_IOCTL, &req) < 0) {
        perror("GPIO_V2_GET_LINE_IOCTL");
        exit(1);
    }
    return req.fd;
}

int main(int argc, char **argv)
{
    int chip;

    if (argc < 3)
        return 2;
    chip = open(argv[1], O_RDWR);
    if (chip < 0) {
        perror(argv[1]);
        return 1;
    }
    if (!strcmp(argv[2], "info")) {
        struct gpiochip_info ci;
        if (ioctl(chip, GPIO_GET_CHIPINFO_IOCTL, &ci) < 0) {
            perror("GPIO_GET_CHIPINFO_IOCTL");
            return 1;
        }
        for (unsigned int i = 0; i < ci.lines; i++) {
            struct gpio_v2_line_info li;
            memset(&li, 0, sizeof(li));
            li.offset = i;
            if (ioctl(chip, GPIO_V2_GET_LINEINFO_IOCTL, &li) < 0) {
                perror("GPIO_V2_GET_LINEINFO_IOCTL");
                return 1;
            }
            printf("%u %s\n", i, li.name[0] ? li.name : "-");
        }
        return 0;
    }
    if (argc < 4)
        return 2;
    unsigned int line = (unsigned int)atoi(argv[3]);
    if (!strcmp(argv[2], "out") && argc > 4) {
        int fd = request(chip, line, GPIO_V2_LINE_FLAG_OUTPUT, atoi(argv[4]));
        close(fd);
        return 0;
    }
    if (!strcmp(argv[2], "get")) {
        struct gpio_v2_line_values v = { .bits = 0, .mask = 1 };
        int fd = request(chip, line, GPIO_V2_LINE_FLAG_INPUT, 0);
        if (ioctl(fd, GPIO_V2_LINE_GET_VALUES_IOCTL, &v) < 0) {
            perror("GPIO_V2_LINE_GET_VALUES_IOCTL");
            return 1;
        }
        printf("%d\n", (int)(v.bits & 1));
        return 0;
    }
    if (!strcmp(argv[2], "wait") && argc > 4) {
        int fd = request(chip, line, GPIO_V2_LINE_FLAG_INPUT | GPIO_V2_LINE_FLAG_EDGE_RISING |
                         GPIO_V2_LINE_FLAG_EDGE_FALLING, 0);
        struct pollfd p = { .fd = fd, .events = POLLIN };
        struct gpio_v2_line_event ev;
        printf("armed\n");
        fflush(stdout);
        if (poll(&p, 1, atoi(argv[4])) <= 0) {
            printf("timeout\n");
            return 0;
        }
        if (read(fd, &ev, sizeof(ev)) != sizeof(ev)) {
            perror("read event");
            return 1;
        }
        printf("%s\n", ev.id == GPIO_V2_LINE_EVENT_RISING_EDGE ? "rising" : "falling");
        return 0;
    }
    return 2;
}
